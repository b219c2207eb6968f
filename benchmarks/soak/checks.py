"""The invariants, checked after every fault and at the end of a run."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .daemon import Daemon
from .edge import Origin
from .home import Home
from .jwks import kids_in, short
from .logs import log
from .settings import RING, Settings
from .verifiers import Verifiers
from .watcher import Watcher

STATE_ORDER = ["pending", "published", "active", "retired", "expired", "destroyed"]
IN_JWKS = {"published", "active", "retired"}
HAS_PRIVATE = {"pending", "published", "active", "retired", "expired"}
#: The audit event of each transition, by the state timestamp it sets.
TRANSITION_EVENTS = {
    "published_at": "key.published",
    "activated_at": "key.promoted",
    "retired_at": "key.retired",
    "expired_at": "key.expired",
    "destroyed_at": "key.destroyed",
    "revoked_at": "key.revoked",
}


def parse_ts(s: str | None) -> float | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def key_problems(s: Settings, k: dict[str, Any], bootstrapped: bool) -> list[str]:
    """One key's state and timestamps against the timing rules.

    Promotion may come any time after A from publication (later when a
    publisher's read-back failed: continuity restarts), never earlier.
    """
    st, kid = k["state"], short(k["kid"])
    if st not in STATE_ORDER and st != "revoked":
        return [f"{kid}: unknown state {st}"]
    out = []
    times = [parse_ts(k.get(f)) for f in
             ("created_at", "published_at", "activated_at", "retired_at", "expired_at",
              "destroyed_at")]  # fmt: skip
    present = [t for t in times if t is not None]
    if present != sorted(present):
        out.append(f"{kid}: timestamps out of order {times}")
    need = STATE_ORDER.index(st) if st in STATE_ORDER else 0
    missing = [f for f, t in zip(STATE_ORDER[1:], times[1:], strict=True)
               if STATE_ORDER.index(f) <= need and t is None]  # fmt: skip
    if missing:
        out.append(f"{kid}: state {st} but no time for {missing}")
    pub, act, ret, exp, des = times[1:]
    if act is not None and pub is not None and not bootstrapped and act - pub < s.publish_ahead:
        out.append(f"{kid}: promoted {act - pub:.0f}s after publication (< A={s.publish_ahead}s)")
    if ret is not None and exp is not None and exp - ret < s.retire_grace:
        out.append(f"{kid}: unpublished {exp - ret:.0f}s after retiring (< G)")
    if exp is not None and des is not None and des - exp < s.destroy_after:
        out.append(f"{kid}: destroyed {des - exp:.0f}s after expiring (< D)")
    return out


def audit_problems(home: Home) -> list[str]:
    """``keymgr audit verify`` while the daemon runs."""
    for attempt in range(3):
        proc = home.cli("audit", "verify")
        if proc.returncode == 0:
            return []
        # The daemon may be appending at this very moment: a torn last
        # line that is gone a moment later is not damage.
        if "incomplete last line" not in proc.stderr or attempt == 2:
            return [f"audit verify: {proc.stderr.strip()}"]
        time.sleep(0.5)
    return []


def final_audit(home: Home) -> tuple[list[str], Counter[str]]:
    """After the daemon stopped: the chain verifies, and (invariant 7, across
    every SIGKILL) each transition recorded in state has exactly one audit
    event. What went wrong, and the count of each event."""
    failures = []
    proc = home.cli("audit", "verify")
    if proc.returncode != 0:
        failures.append(f"final audit verify: {proc.stderr.strip()}")
    shown = home.cli("audit", "show", "--json").stdout.splitlines()
    events = [json.loads(x) for x in shown]
    counts = Counter(e["event"] for e in events)
    per_key = Counter((e["event"], e.get("kid")) for e in events)
    for k in home.status()["rings"][RING]["keys"]:
        kid = k["kid"]
        made = per_key[("key.generated", kid)] + per_key[("key.adopted", kid)]
        if made != 1:
            failures.append(f"{short(kid)}: {made} creation events (want 1)")
        for f, ev in TRANSITION_EVENTS.items():
            want = 1 if k.get(f) else 0
            if per_key[(ev, kid)] != want:
                failures.append(f"{short(kid)}: {per_key[(ev, kid)]} {ev} events, want {want}")
    return failures, counts


@dataclass
class CheckResult:
    label: str
    t: float
    ok: bool
    problems: list[str] = field(default_factory=list)
    recovered_in: float | None = None
    rejections_so_far: int = 0
    keys: int = 0
    #: Not problems, but worth reading (a destroy caught between backend and state).
    notes: list[str] = field(default_factory=list)


class Checker:
    """Checks state, backend, served JWKS, audit log and verifiers against the rules.

    ``km`` is an in-process ``KeyManager`` on the run's config; ``backend`` its
    backend of the ring (to list the keys it really holds).
    """

    def __init__(
        self, s: Settings, home: Home, km: Any, backend: Any, origin: Origin, daemon: Daemon,
        verifiers: Verifiers, watcher: Watcher,
    ) -> None:  # fmt: skip
        self.s, self.home, self.km, self.backend = s, home, km, backend
        self.origin, self.daemon, self.verifiers, self.watcher = origin, daemon, verifiers, watcher
        self.publisher = home.env.publisher
        self.checks: list[CheckResult] = []
        self.known: dict[str, str] = {}  # kid -> last state seen
        #: Keys seen destroyed in the backend but not yet in state (a daemon
        #: killed between the two): the end check wants them recorded.
        self.destroys_in_flight: set[str] = set()
        self.audit_counts: Counter[str] = Counter()

    def recovery_window(self) -> float:
        """How long a recovery may take: 30 s, plus the pass lock a SIGKILLed
        daemon may have left on a shared store (taken over after its lock_ttl)."""
        return 30.0 + float(getattr(self.km.store, "lock_ttl", 0.0))

    def wait_recovered(self, timeout: float | None = None) -> tuple[float | None, str]:
        """Until the daemon has re-published: publisher record fresh, served JWKS == state."""
        timeout = self.recovery_window() if timeout is None else timeout
        t0 = time.monotonic()
        why = ""
        while time.monotonic() - t0 < timeout:
            self.daemon.poll()
            try:
                st = self.km.state()
                ring = st.ring(RING)
                rec = st.publishers.get(self.publisher)
                want = {k.kid for k in ring.keys if k.state in IN_JWKS}
                served = self.served()
                if ring.active is None:
                    why = "no active key"
                elif rec is None or rec.stale:
                    why = "publisher record stale"
                elif served != want:
                    why = f"served {sorted(map(short, served))} != state {sorted(map(short, want))}"
                else:
                    return time.monotonic() - t0, ""
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
        return None, why

    def check_all(self, label: str) -> CheckResult:
        """The invariants, after a fault (or at the end)."""
        res = CheckResult(label, time.time(), True)
        rec_t, why = self.wait_recovered()
        res.recovered_in = rec_t
        if rec_t is None:
            res.problems.append(f"not recovered within {self.recovery_window():g}s: {why}")
        try:
            self._check_state(res, final=label.startswith("end"))
        except Exception as e:
            res.problems.append(f"state check failed: {type(e).__name__}: {e}")
        res.problems += audit_problems(self.home)
        rej = self.verifiers.rejections()
        res.rejections_so_far = len(rej)
        if rej and not self.s.misconfigure:
            res.problems.append(f"{len(rej)} rejection(s) of valid tokens so far")
        if self.watcher.private_leaks:
            res.problems.append(f"private members published: {self.watcher.private_leaks[:3]}")
        res.ok = not res.problems
        self.checks.append(res)
        log(
            f"check {label}: {'ok' if res.ok else 'FAILED'}"
            + (f" (recovered in {rec_t:.1f}s)" if rec_t is not None else "")
            + "".join(f"\n    - {p}" for p in res.problems)
        )
        return res

    def _check_state(self, res: CheckResult, final: bool = False) -> None:
        doc = self.home.status()
        ring = doc["rings"].get(RING)
        if ring is None:
            res.problems.append(f"ring {RING} missing from status")
            return
        keys = ring["keys"]
        res.keys = len(keys)
        active = [k for k in keys if k["state"] == "active"]
        if len(active) != 1:
            res.problems.append(f"{len(active)} active keys (want exactly 1)")
        first = min(keys, key=lambda k: k["created_at"])["kid"] if keys else None
        for k in keys:
            res.problems += key_problems(self.s, k, bootstrapped=k["kid"] == first)
        self._check_history(res, keys)
        # Private material and the served JWKS agree with state. The daemon keeps
        # working meanwhile, so look at a few snapshots before calling it a fault.
        for _ in range(10):
            problems, in_flight = self._consistency()
            if not problems and not in_flight:
                break
            time.sleep(0.3)
        res.problems += problems
        self._settle_destroys(res, in_flight, final)

    def _settle_destroys(self, res: CheckResult, in_flight: set[str], final: bool) -> None:
        """A daemon killed between a backend's destroy and the state commit
        leaves a key due for destruction ``expired`` in state but gone from the
        backend; the next pass records it (``destroy`` is idempotent). That
        pass may wait for a pass lock the killed daemon held (up to the
        store's lock_ttl), so after a fault it is a note; at the end every
        such key must have been recorded destroyed."""
        self.destroys_in_flight |= in_flight
        if not final:
            res.notes += [f"{short(k)}: destroyed in backend, not yet in state" for k in in_flight]
            return
        deadline = time.monotonic() + 45
        while True:
            states = {k["kid"]: k["state"] for k in self.km.status()["rings"][RING]["keys"]}
            left = {k for k in self.destroys_in_flight if states.get(k) != "destroyed"}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        res.problems += [f"{short(k)}: gone from backend, never recorded destroyed" for k in left]

    def _check_history(self, res: CheckResult, keys: list[dict[str, Any]]) -> None:
        """Nothing recorded is ever lost, and states only move forward."""
        by_kid = {k["kid"]: k for k in keys}
        for kid, old in self.known.items():
            k = by_kid.get(kid)
            if k is None:
                res.problems.append(
                    f"{short(kid)}: recorded earlier ({old}), now missing from state"
                )
            elif (
                k["state"] in STATE_ORDER
                and old in STATE_ORDER
                and (STATE_ORDER.index(k["state"]) < STATE_ORDER.index(old))
            ):
                res.problems.append(f"{short(kid)}: state went back from {old} to {k['state']}")
        for k in keys:
            self.known[k["kid"]] = k["state"]

    def _consistency(self) -> tuple[list[str], set[str]]:
        """Backend keys and served JWKS against one ``status`` (listings taken
        around it); and the keys whose destroy is in flight (see ``_settle_destroys``)."""
        problems, in_flight = [], set()
        t = time.time()
        listed_before = set(self.backend.list_keys(RING))
        # In-process KeyManager.status() (what `status --json` prints): milliseconds,
        # so the two reads of the served JWKS bracket it tightly.
        served_before = self.served()
        keys = self.km.status()["rings"][RING]["keys"]
        served_after = self.served()
        listed_after = set(self.backend.list_keys(RING))
        for k in keys:
            kid, st = k["kid"], k["state"]
            if st in HAS_PRIVATE and kid not in listed_before | listed_after:
                exp = parse_ts(k.get("expired_at"))
                if st == "expired" and exp is not None and exp + self.s.destroy_after <= t:
                    in_flight.add(kid)
                else:
                    problems.append(f"{short(kid)}: {st} in state but gone from backend")
            if st == "destroyed" and kid in listed_after:
                problems.append(f"{short(kid)}: destroyed but still in backend")
        want = {k["kid"] for k in keys if k["state"] in IN_JWKS}
        pending = {k["kid"] for k in keys if k["state"] == "pending"}
        for served in (served_before, served_after):
            if not want <= served or served - want - pending:
                problems.append(
                    f"served JWKS {sorted(map(short, served))} != state {sorted(map(short, want))}"
                )
                break
        return problems, in_flight

    def served(self) -> set[str]:
        """The kids the origin serves now."""
        return kids_in(self.origin.read()[0])

    def final_audit(self) -> list[str]:
        """``final_audit`` of the run's home; keeps the event counts for the report."""
        failures, self.audit_counts = final_audit(self.home)
        return failures
