"""The soak's knobs, what they resolve to (A, G, faults, time limit), and constants."""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
#: This package's folder, which also holds the verifier scripts and node_modules.
HERE = Path(__file__).resolve().parent
PY = sys.executable
RING = "default"
#: The ring's algorithm without ``--migrate``.
DEFAULT_ALG = "ES256"
#: How the issuer obtains its tokens (``--issuer``).
ISSUERS = ("api", "service")
#: The signing service's Unix socket, in the workdir (``--issuer service``).
SOCKET_NAME = "sign.sock"
BACKENDS = ("file", "aws-kms", "vault-transit", "pkcs11", "gcs", "azure")
REGION = "us-east-1"

#: The faults each backend can suffer (see the package docstring).
FAULTS_ABLE: dict[str, tuple[str, ...]] = {
    "file": ("kill", "block", "edge-stale"),
    "aws-kms": ("kill", "pause", "edge-stale"),
    "vault-transit": ("kill", "block", "pause", "edge-stale"),
    "pkcs11": ("kill", "block", "edge-stale"),
    "gcs": ("kill", "pause", "edge-stale"),
    "azure": ("kill", "pause", "edge-stale"),
}
#: What ``--faults`` injects without ``--fault-kinds``: every fault keymgr
#: promises to survive. ``edge-stale`` (issue 20) joins them with
#: ``--verify-edge``: keymgr survives a stale edge only when it probes it.
DEFAULT_FAULTS: dict[str, tuple[str, ...]] = {
    "file": ("kill", "block"),
    "aws-kms": ("kill", "pause"),
    "vault-transit": ("kill", "block", "pause"),
    "pkcs11": ("kill", "block"),
    "gcs": ("kill", "pause"),
    "azure": ("kill", "pause"),
}


@dataclass
class Settings:
    backend: str = "file"
    rotations: int = 10
    period: int = 5  # P
    cache: int = 2  # L: longest verifier JWKS cache lifetime, and the Cache-Control max-age
    skew: int = 1  # S: issuer clocks off by up to +-S; every verifier's leeway
    ttl: int = 3  # T: token lifetime
    resolution: int = 0  # R: extra margin on A and G (s)
    publish_ahead: int = 0  # A (0: L + R)
    retire_grace: int = 0  # G (0: T + S + R)
    destroy_after: int = 1  # D
    rate: float = 20.0  # tokens per second
    late_margin: float = 0.5  # the late check runs this long before exp
    faults: bool = False
    fault_kinds: tuple[str, ...] = ()
    #: How long the edge serves its last good copy while its origin fails.
    stale_if_error: float = 60.0
    #: keymgr probes the edge (``verify_urls``): promotion waits for what it serves.
    verify_edge: bool = False
    misconfigure: bool = False
    #: ``api``: KeyManager.sign in the soak's process; ``service``: POST
    #: /v1/rings/{ring}/sign on the daemon's Unix socket (``[service]``).
    issuer: str = "api"
    #: ``--migrate RS256,ES256,EdDSA``: the ring starts with the first; after
    #: every ``migrate_every`` rotations the config names the next (in a
    #: cycle) and the daemon gets SIGHUP. Verifiers allow all of them.
    migrate: tuple[str, ...] = ()
    migrate_every: int = 1
    cloud_state: bool = False  # state in S3 (aws-kms) / Vault KV (vault-transit)
    node: bool = True
    seed: int = 0
    max_seconds: float = 0.0  # 0: derived from rotations and period
    workdir: str | None = None
    keep: bool = False

    @property
    def algorithms(self) -> tuple[str, ...]:
        """Every algorithm the ring signs with in this run: the verifiers' allowlist."""
        return self.migrate or (DEFAULT_ALG,)

    def resolve(self) -> None:
        if self.backend == "gcs":
            self.cloud_state = True  # its state always lives in GCS
        if self.misconfigure:
            # Caches longer than publish_ahead: the promise cannot hold.
            self.publish_ahead = self.publish_ahead or 1
            self.cache = max(self.cache, self.publish_ahead + 3)
            self.period = max(self.period, self.cache + 1)
        self.publish_ahead = self.publish_ahead or self.cache + self.resolution
        # Issuers on an S3 / Vault state store notice a promotion within 1 s
        # (KeyManager.sign trusts the store's fingerprint that long): the old
        # key may sign for up to 1 s after it retired.
        window = 1 if self.cloud_state else 0
        self.retire_grace = self.retire_grace or self.ttl + self.skew + self.resolution + window
        if not self.seed:
            self.seed = secrets.randbelow(2**31) + 1
        if not self.fault_kinds:
            self.fault_kinds = DEFAULT_FAULTS.get(self.backend, ())
            if self.verify_edge:
                self.fault_kinds = (*self.fault_kinds, "edge-stale")
        if not self.max_seconds:
            self.max_seconds = 60 + self.rotations * self.period * (3 if self.faults else 2)

    def check(self) -> str | None:
        if self.backend not in BACKENDS:
            return f"--backend: one of {', '.join(BACKENDS)}"
        if self.publish_ahead > self.period:
            return "publish_ahead must not be longer than the period"
        if min(self.period, self.cache, self.ttl, self.rotations) < 1:
            return "--period, --cache, --ttl and --rotations must be at least 1"
        if self.late_margin >= self.ttl:
            return "--late-margin must be shorter than --ttl"
        if self.stale_if_error < 0:
            return "--stale-if-error must not be negative"
        if self.issuer not in ISSUERS:
            return f"--issuer: one of {', '.join(ISSUERS)}"
        if self.migrate:
            err = self._check_migrate()
            if err:
                return err
        able = FAULTS_ABLE[self.backend]
        if not set(self.fault_kinds) <= set(able):
            return f"--fault-kinds: {self.backend} supports {', '.join(sorted(able))}"
        return None

    def _check_migrate(self) -> str | None:
        from keymgr.jose import ALGORITHMS

        unknown = [a for a in self.migrate if a not in ALGORITHMS]
        if unknown:
            known = ", ".join(sorted(ALGORITHMS))
            return f"--migrate: unknown algorithm {unknown[0]!r} (one of {known})"
        if len(self.migrate) < 2 or len(set(self.migrate)) != len(self.migrate):
            return "--migrate: at least two algorithms, each named once (e.g. RS256,ES256,EdDSA)"
        if self.migrate_every < 1:
            return "--migrate-every must be at least 1"
        # Switch j comes when the j * N-th key is in use: the last
        # algorithm's first key is key (len - 1) * N (0-based).
        need = (len(self.migrate) - 1) * self.migrate_every
        if self.rotations < need:
            return (
                f"--migrate: {len(self.migrate)} algorithms every {self.migrate_every} "
                f"rotation(s) need --rotations {need} or more"
            )
        return None
