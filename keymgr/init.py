"""``keymgr init``: a working default config and a fresh master key."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from pathlib import Path

from keymgr.errors import ConfigError, KeymgrError
from keymgr.fsutil import write_all

CONFIG_TEMPLATE = """\
# keymgr configuration: see docs/configuration/index.md.

[daemon]
state = "file:state.json"              # or s3://bucket/key, vault://mount/path
audit_log = "audit.jsonl"
reconcile_interval = "60s"
listen = "127.0.0.1:9464"              # /healthz, /readyz, /metrics

[backends.local]
type = "file"                          # local encrypted files (AES-256-GCM)
path = "keys"
master_key_file = "master.key"

[publishers.site]
type = "file"
path = "public/.well-known/jwks.json"  # serve this directory statically

[keyrings.default]
backend = "local"
algorithm = "ES256"
rotation_period = "30d"
publish_ahead = "1h"                   # >= the longest JWKS cache time of any verifier
retire_grace = "1d"                    # >= the longest token lifetime plus clock skew
destroy_after = "7d"
publishers = ["site"]
"""


def init(directory: str) -> list[str]:
    d = Path(directory)
    cfg = d / "keymgr.toml"
    key = d / "master.key"
    for p in (cfg, key):
        if os.path.lexists(p):  # a dangling symlink too
            raise ConfigError(f"{p}: already exists; refusing to overwrite it")
    # O_EXCL|O_NOFOLLOW: never through a file or symlink planted at either name.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    made: list[Path] = []
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, flags, 0o600)
        made.append(key)
        try:
            os.fchmod(fd, 0o600)  # exactly 0600: the backend refuses a key others can read
            write_all(fd, base64.b64encode(secrets.token_bytes(32)) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(cfg, flags, 0o644)
        made.append(cfg)
        try:
            write_all(fd, CONFIG_TEMPLATE.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        # What this call created goes (a short master key or config, from a
        # full disk): the next init, once the cause is fixed, finds nothing
        # in its way. Nothing else is touched.
        for p in made:
            with contextlib.suppress(OSError):
                p.unlink()
        raise KeymgrError(f"{directory}: cannot write: {e.strerror}") from None
    return [
        f"wrote {cfg}",
        f"wrote {key} (mode 0600; back it up: without it no key can be used)",
        f"next: keymgr --config {cfg} run",
    ]
