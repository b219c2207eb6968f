"""The verifier processes (PyJWT, jwcrypto, npm jose): how each is started, and what it saw."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .logs import log, read_jsonl
from .settings import HERE, PY, Settings


@dataclass
class VerifierSpec:
    name: str
    library: str
    cmd: list[str]
    cache: str  # human description of its caching
    out: Path
    proc: subprocess.Popen[bytes] | None = None


def lib_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def node_tools() -> str | None:
    """None when node and npm exist, else why not."""
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def node_version() -> str:
    try:
        return subprocess.run(
            ["node", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        return "?"


def ensure_node_modules() -> str:
    """``npm ci`` into benchmarks/soak/node_modules at first use; the jose version."""
    from benchmarks._common import npm_ci

    pkg = HERE / "node_modules" / "jose" / "package.json"
    if not pkg.exists():
        log("npm ci (benchmarks/soak)")
    npm_ci(HERE, pkg, timeout=300)
    return str(json.loads(pkg.read_text())["version"])


def verifier_specs(s: Settings, url: str, queue: Path, work: Path) -> list[VerifierSpec]:
    common = [
        "--url", url, "--queue", str(queue), "--alg", ",".join(s.algorithms),
        "--leeway", str(s.skew), "--late-margin", str(s.late_margin),
    ]  # fmt: skip
    L = str(s.cache)
    specs = [
        VerifierSpec(
            "pyjwt",
            f"PyJWT {lib_version('PyJWT')} PyJWKClient",
            [PY, str(HERE / "verify_py.py"), "--kind", "pyjwt", "--lifetime", L,
             "--cooldown", L, "--out", str(work / "v-pyjwt.jsonl"), *common],
            f"lifespan={L}s cooldown_duration={L}s",
            work / "v-pyjwt.jsonl",
        ),
        VerifierSpec(
            "jwcrypto",
            f"jwcrypto {lib_version('jwcrypto')} JWKSet",
            [PY, str(HERE / "verify_py.py"), "--kind", "jwcrypto", "--lifetime", L,
             "--cooldown", L, "--out", str(work / "v-jwcrypto.jsonl"), *common],
            f"Cache-Control max-age (={L}s), unknown-kid refresh after {L}s",
            work / "v-jwcrypto.jsonl",
        ),
    ]  # fmt: skip
    if s.node:
        jose = ensure_node_modules()
        specs.append(
            VerifierSpec(
                "jose",
                f"jose {jose} createRemoteJWKSet (node {node_version()})",
                ["node", str(HERE / "verify_node.mjs"), "--lifetime", L, "--cooldown", L,
                 "--out", str(work / "v-jose.jsonl"), *common],
                f"cacheMaxAge={L}s cooldownDuration={L}s",
                work / "v-jose.jsonl",
            )
        )  # fmt: skip
    return specs


class Verifiers:
    """The verifier processes of one run: started, watched, finished, read back."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.specs: list[VerifierSpec] = []

    def __iter__(self) -> Iterator[VerifierSpec]:
        return iter(self.specs)

    def err_tail(self, v: VerifierSpec) -> str:
        return (self.work / f"v-{v.name}.err").read_text()[-1500:]

    def start(self, s: Settings, url: str, queue: Path, rng: random.Random) -> None:
        self.specs = verifier_specs(s, url, queue, self.work)
        for i, v in enumerate(self.specs):
            if i:
                # Staggered, so their cache refreshes fall at different
                # moments of the rotation cycle.
                time.sleep(s.cache / len(self.specs) * rng.uniform(0.5, 1.5))
            v.proc = subprocess.Popen(
                v.cmd, cwd=HERE, stderr=(self.work / f"v-{v.name}.err").open("wb")
            )

    def check_alive(self) -> None:
        for v in self.specs:
            if v.proc is not None and v.proc.poll() is not None:
                raise RuntimeError(f"verifier {v.name} exited {v.proc.returncode}: "
                                   f"{self.err_tail(v)}")  # fmt: skip

    def finish(self, timeout: float) -> list[str]:
        """Wait for each to drain the queue (the issuer has ended it); what went wrong."""
        failures = []
        for v in self.specs:
            assert v.proc is not None
            try:
                rc = v.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                v.proc.kill()
                rc = v.proc.wait()
                failures.append(f"verifier {v.name} did not finish")
            if rc != 0:
                failures.append(f"verifier {v.name} exited {rc}: {self.err_tail(v)}")
        return failures

    def kill(self) -> None:
        for v in self.specs:
            if v.proc is not None and v.proc.poll() is None:
                v.proc.kill()
                v.proc.wait()

    def rejections(self) -> list[dict[str, Any]]:
        """Every failed check so far, each with its verifier's name."""
        out = []
        for v in self.specs:
            out += [
                {**r, "verifier": v.name}
                for r in read_jsonl(v.out)
                if r.get("ev") == "check" and not r.get("ok")
            ]
        return out
