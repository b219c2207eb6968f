"""The report of a run: a JSON-able dict (``--json``), also what ``render`` prints."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .logs import normalise_reason, read_jsonl
from .verifiers import VerifierSpec

if TYPE_CHECKING:
    from .runner import Runner


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def verifier_summary(
    v: VerifierSpec, first_use: dict[str, float], rotated: list[str], alg_of: dict[str, str]
) -> dict[str, Any]:
    """What one verifier checked, rejected (and why), and fetched; accepted
    checks per algorithm (``alg_of``: each key's, from the tokens' headers)."""
    recs = read_jsonl(v.out)
    checks = [r for r in recs if r.get("ev") == "check"]
    rej = [r for r in checks if not r.get("ok")]
    fetches = [r for r in recs if r.get("ev") == "fetch"]
    first_fetch: dict[str, float] = {}
    for f in fetches:
        for k in f.get("kids", []):
            first_fetch.setdefault(k, f["t"])
    gaps = [first_use[k] - first_fetch[k] for k in rotated if k in first_fetch]
    return {
        "name": v.name,
        "library": v.library,
        "cache": v.cache,
        "checked": len(checks),
        "fresh": sum(1 for r in checks if r.get("phase") == "fresh"),
        "late": sum(1 for r in checks if r.get("phase") == "late"),
        "skipped": sum(1 for r in recs if r.get("ev") == "skip"),
        "rejected": len(rej),
        "reasons": dict(Counter(
            f"{r.get('phase')}: {normalise_reason(r.get('reason', ''))}" for r in rej
        ).most_common()),
        "rejected_kids": dict(Counter(str(r.get("kid")) for r in rej)),
        "kids_seen": len({r.get("kid") for r in checks}),
        "accepted_by_alg": dict(sorted(Counter(
            alg_of.get(str(r.get("kid")), "?") for r in checks if r.get("ok")
        ).items())),
        "fetches": len(fetches),
        "pub_to_use_gap_max": _r(max(gaps)) if gaps else None,
        "pub_to_use_gap_min": _r(min(gaps)) if gaps else None,
        "done": any(r.get("ev") == "done" for r in recs),
    }  # fmt: skip


def key_timing(run: Runner) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """Keys in order of first use; publication -> first use per rotated key (the
    first key was bootstrapped); last valid moment of any of its tokens -> it
    left the JWKS."""
    first_use, last_exp = run.issuer.first_use, run.issuer.last_exp
    used = sorted(first_use, key=lambda k: first_use[k])
    seen, removed = run.watcher.first_seen, run.watcher.removed
    pub_gaps = {k: first_use[k] - seen[k] for k in used[1:] if k in seen}
    ret_margins = {k: removed[k] - last_exp[k] for k in used if k in removed}
    return used, pub_gaps, ret_margins


def issuer_summary(run: Runner) -> dict[str, Any]:
    """How the issuer obtained its tokens (``--issuer``)."""
    s, client = run.s, run.issuer.client
    if s.issuer != "service":
        return {"mode": "api", "how": "KeyManager.sign in the soak's process, now = skewed clock"}
    return {
        "mode": "service",
        "socket": str(run.home.socket),
        "how": (
            "POST /v1/rings/{ring}/sign, claims with the issuer's own (skewed) iat and exp"
            if s.skew else 'POST /v1/rings/{ring}/sign with "ttl" (the daemon\'s clock)'
        ),
        "requests": client.requests if client is not None else 0,
        "connections": client.connects if client is not None else 0,
        "service_refused_events": run.checker.audit_counts.get("service.refused", 0),
    }


def migration_summary(run: Runner) -> dict[str, Any]:
    """``--migrate``: the changes made, each key's algorithm against the schedule,
    and the sets of algorithms the JWKS held."""
    s, t0 = run.s, run.t0
    algs, every = s.migrate, s.migrate_every
    first_use, alg_of = run.issuer.first_use, run.issuer.alg_of
    used = sorted(first_use, key=lambda k: first_use[k])
    keys = []
    for i, kid in enumerate(used):
        want = algs[(i // every) % len(algs)]
        keys.append({"kid": kid, "alg": alg_of.get(kid), "scheduled": want})
    counts = run.checker.audit_counts
    assert run.migrator is not None
    return {
        "algorithms": list(algs),
        "every": every,
        "switches": run.migrator.switches,
        "sighups": run.daemon.hups,
        "config_loaded": counts.get("config.loaded", 0),
        "config_rejected": counts.get("config.rejected", 0),
        "keys": keys,
        "keys_by_alg": dict(sorted(Counter(k["alg"] for k in keys).items())),
        # A switch that came after the successor was generated: the key after
        # it has the new algorithm instead (not a fault; see migrate.py).
        "keys_off_schedule": sum(1 for k in keys if k["alg"] != k["scheduled"]),
        "jwks_alg_sets": [
            {"algs": list(a), "first_seen": _r(v["first_seen"] - t0), "seconds": _r(v["seconds"])}
            for a, v in sorted(run.watcher.alg_sets.items(), key=lambda x: x[1]["first_seen"])
        ],
    }


def build_report(run: Runner) -> dict[str, Any]:
    s, env, daemon, t0 = run.s, run.env, run.daemon, run.t0
    used, pub_gaps, ret_margins = key_timing(run)
    first_use, seen, removed = run.issuer.first_use, run.watcher.first_seen, run.watcher.removed
    alg_of = run.issuer.alg_of
    verifiers = [verifier_summary(v, first_use, used[1:], alg_of) for v in run.verifiers]
    rejected = sum(v["rejected"] for v in verifiers)
    rejected_kids: Counter[str] = Counter()
    for v in verifiers:
        rejected_kids.update(v["rejected_kids"])
    checks, faults = run.checker.checks, run.scheduler.faults
    if s.misconfigure:
        passed = rejected > 0
    else:
        passed = (
            rejected == 0
            and all(c.ok for c in checks)
            and not run.failures
            and not daemon.unexpected_exits
            and all(v["done"] for v in verifiers)
        )
    return {
        "passed": passed,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": asdict(s),
        "keymgr_settings": {
            "rotation_period": s.period,
            "publish_ahead": s.publish_ahead,
            "retire_grace": s.retire_grace,
            "destroy_after": s.destroy_after,
            "verifier_cache_max": s.cache,
            "cache_control": env.cache_control,
            "clock_skew": s.skew,
            "token_ttl": s.ttl,
            "state_store": env.state_url().split(":", 1)[0],
            # Where the audit chain is kept: the shared store's objects, or the file.
            "audit_record": "file" if env.state_url().startswith("file:") else "store",
            "audit_file": (run.home.work / "audit.jsonl").exists(),
        },
        "config_warnings": run.home.config_warnings,
        "wall_seconds": round(time.time() - t0, 1),
        "rotations": run.rotations(),
        "tokens_issued": len(run.issuer.tokens),
        "issuer_errors": dict(run.issuer.errors.most_common()),
        "issuer": issuer_summary(run),
        "tokens_by_alg": dict(sorted(run.issuer.by_alg.items())),
        "migration": migration_summary(run) if s.migrate else None,
        "rejections": rejected,
        "rejected_kids": dict(rejected_kids.most_common()),
        "verifiers": verifiers,
        "publication_to_first_use": {
            "min": _r(min(pub_gaps.values())) if pub_gaps else None,
            "max": _r(max(pub_gaps.values())) if pub_gaps else None,
            "keys": len(pub_gaps),
        },
        "last_expiry_to_unpublication": {
            "min": _r(min(ret_margins.values())) if ret_margins else None,
            "keys": len(ret_margins),
        },
        "keys": [
            {
                "kid": k,
                "alg": alg_of.get(k),
                "served_at": _r(seen[k] - t0) if k in seen else None,
                "first_use": _r(first_use[k] - t0),
                "publication_to_first_use": _r(pub_gaps.get(k)),
                "unserved_at": _r(removed[k] - t0) if k in removed else None,
                "last_expiry_to_unpublication": _r(ret_margins.get(k)),
            }
            for k in used
        ],
        "keys_republished_after_removal": len(run.watcher.reappeared),
        "private_members_published": run.watcher.private_leaks,
        "edge": {
            "requests": run.edge.requests,
            "stale_served": run.edge.stale,
            "refused": run.edge.refused,
            "stale_if_error": s.stale_if_error,
        },
        "daemon": {
            "starts": daemon.starts,
            "sigkills": daemon.kills,
            "unexpected_exits": daemon.unexpected_exits,
        },
        "faults": faults,
        "checks": [asdict(c) for c in checks],
        "audit_events": dict(run.checker.audit_counts),
        "failures": run.failures,
    }
