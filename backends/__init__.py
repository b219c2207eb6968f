"""Every adapter to a system outside keymgr, one folder per provider.

Installed as ``keymgr.backends`` (see ``package-dir`` in pyproject.toml), not as
a top-level ``backends`` package: that generic name would collide with other
distributions. The core (``keymgr``) imports none of these modules directly;
it loads them by name through :mod:`keymgr.plugins`.

- ``local``: encrypted key files, the JWKS file publisher, the state file.
- ``aws``: the AWS client, KMS keys, the S3 publisher, the S3 state store.
- ``vault``: the Vault / OpenBao client, transit keys, the KV v2 state store.
"""
