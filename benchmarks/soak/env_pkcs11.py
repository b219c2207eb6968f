"""The PKCS#11 backend's soak setup: a SoftHSM2 token in the workdir, state and JWKS in files.

``--backend pkcs11``: keys on a SoftHSM2 token initialised for the run in
``WORKDIR/softhsm`` (its own ``softhsm2.conf``, passed to every process
through ``SOFTHSM2_CONF``), the PIN in ``WORKDIR/hsm.pin`` (mode 0600), the
state and the JWKS in files as with the file backend. Three processes use the
token at once, each with its own PKCS#11 session: the daemon (generate,
destroy), the issuer in the soak process (sign, through ``KeyManager``) and
the checker (list keys).

Faults: ``kill`` and ``block`` as for the file backend, and ``edge-stale``.
No ``pause``: SoftHSM is a library inside each process, with no server to
stop, and taking its token directory away does not look like an HSM outage
(SoftHSM then shows an empty token, without an error, until the process
restarts).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
from collections.abc import Iterator

from .environments import Env
from .settings import REPO

TOKEN = "keymgr-soak"


class Pkcs11Env(Env):
    name = "pkcs11"

    def start(self) -> None:
        sys.path.insert(0, str(REPO))
        from tests import servers_softhsm

        module = servers_softhsm.softhsm_module()
        if module is None or shutil.which("softhsm2-util") is None:
            raise RuntimeError("SoftHSM2 not installed (apt-get install softhsm2)")
        base = self.work / "softhsm"
        tokens = base / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        conf = base / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        pin = secrets.token_hex(12)
        servers_softhsm.init_token(conf, TOKEN, pin, secrets.token_hex(12))
        pin_file = self.work / "hsm.pin"
        pin_file.write_text(pin + "\n")
        pin_file.chmod(0o600)
        self.module = module
        # Before anything in this process loads the module (it reads it once).
        self.env["SOFTHSM2_CONF"] = str(conf)
        os.environ["SOFTHSM2_CONF"] = str(conf)

    def backend_toml(self) -> str:
        return (
            f'[backends.hsm]\ntype = "pkcs11"\nmodule = "{self.module}"\n'
            f'token_label = "{TOKEN}"\npin_file = "hsm.pin"\nlabel_prefix = "soak"\n'
        )

    def backend_name(self) -> str:
        return "hsm"

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        raise NotImplementedError("pkcs11 (SoftHSM) has no server to pause")
        yield
