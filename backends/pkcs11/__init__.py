"""PKCS#11: signing keys generated and kept on an HSM or smart-card token.

- ``keys``: the key backend (``type = "pkcs11"``): generate, read the public
  half, sign, destroy, through the token's PKCS#11 module.
- ``token``: one session per token and process, shared by every backend on
  that token; login with the PIN, re-opened after a token error; every
  PKCS#11 failure as one line.

``python-pkcs11`` is imported on first use only, so ``keymgr --help`` and
``keymgr config check`` never load it (nor the vendor's module).
"""
