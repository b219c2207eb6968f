"""The report of a run as text, for a terminal."""

from __future__ import annotations

from typing import Any


def render(r: dict[str, Any]) -> str:
    k = r["keymgr_settings"]
    s = r["settings"]
    lines = [
        f"keymgr rollover soak — backend {s['backend']}"
        + (" — MISCONFIGURED (publish_ahead < verifier cache)" if s["misconfigure"] else "")
        + f" — {r['date']}",
        f"settings: P={k['rotation_period']}s A={k['publish_ahead']}s G={k['retire_grace']}s "
        f"D={k['destroy_after']}s; verifier cache <= {k['verifier_cache_max']}s "
        f"(Cache-Control: {k['cache_control']}); clock skew +-{k['clock_skew']}s; "
        f"token ttl {k['token_ttl']}s; state store {k['state_store']}; "
        f"faults {','.join(s['fault_kinds']) if s['faults'] else 'off'}; seed {s['seed']}",
    ]
    for w in r["config_warnings"]:
        lines.append(f"config check: {w}")
    i = r["issuer"]
    if i["mode"] == "service":
        lines.append(
            f"issuer: signing service on {i['socket']}: {i['how']}; {i['requests']} requests "
            f"over {i['connections']} connection(s)"
        )
    lines.append("tokens by algorithm: " + ", ".join(
        f"{a} {n}" for a, n in r["tokens_by_alg"].items()))  # fmt: skip
    m = r.get("migration")
    if m:
        lines.append(
            f"migration {' -> '.join(m['algorithms'])} (cycled, every {m['every']} rotation(s)): "
            f"{len(m['switches'])} changes, {m['sighups']} SIGHUPs, config.loaded "
            f"{m['config_loaded']}, config.rejected {m['config_rejected']}; keys by algorithm "
            + ", ".join(f"{a} {n}" for a, n in m["keys_by_alg"].items())
            + f"; off schedule {m['keys_off_schedule']}"
        )
        lines.append("  JWKS held: " + "; ".join(
            f"{'+'.join(x['algs'])} ({x['seconds']}s)" for x in m["jwks_alg_sets"]))  # fmt: skip
    p, m = r["publication_to_first_use"], r["last_expiry_to_unpublication"]
    lines += [
        f"rotations {r['rotations']}, tokens issued {r['tokens_issued']}, "
        f"wall {r['wall_seconds']}s, rejections {r['rejections']}",
        f"publication -> first use: min {p['min']}s max {p['max']}s over {p['keys']} keys "
        f"(A = {k['publish_ahead']}s)",
        f"last token expiry -> key unpublished: min margin {m['min']}s over {m['keys']} keys",
        "",
        f"{'verifier':9} {'checked':>7} {'fresh':>6} {'late':>6} {'skip':>4} {'rejected':>8} "
        f"{'kids':>4} {'fetches':>7} {'pub->use gap min/max':>21}  library / cache",
    ]
    for v in r["verifiers"]:
        gap = f"{v['pub_to_use_gap_min']}/{v['pub_to_use_gap_max']}"
        lines.append(
            f"{v['name']:9} {v['checked']:>7} {v['fresh']:>6} {v['late']:>6} {v['skipped']:>4} "
            f"{v['rejected']:>8} {v['kids_seen']:>4} {v['fetches']:>7} {gap:>21}  "
            f"{v['library']}; {v['cache']}"
        )
        if len(v["accepted_by_alg"]) > 1:
            lines.append("    accepted: " + ", ".join(
                f"{a} {n}" for a, n in v["accepted_by_alg"].items()))  # fmt: skip
        for reason, n in v["reasons"].items():
            lines.append(f"    {n} x {reason}")
    if r["issuer_errors"]:
        lines.append("issuer errors (not rejections): " + "; ".join(
            f"{n} x {e}" for e, n in r["issuer_errors"].items()))  # fmt: skip
    if r["faults"]:
        lines.append("")
        lines.append(f"faults ({len(r['faults'])}):")
        for f in r["faults"]:
            verdict = "ok" if f["ok"] else "FAILED: " + "; ".join(f["problems"])
            rej = f", {f['rejections']} new rejection(s)" if f.get("rejections") else ""
            rej += "".join(f"; note: {n}" for n in f.get("notes", []))
            lines.append(
                f"  t+{f['at']:>6}s {f['kind']:5} {f['detail']}; recovered in "
                f"{f['recovered_in']}s{rej}; checks {verdict}"
            )
    d, e = r["daemon"], r["edge"]
    lines.append(
        f"daemon: {d['starts']} starts, {d['sigkills']} SIGKILLs, "
        f"unexpected exits {d['unexpected_exits'] or 'none'}; edge served stale "
        f"{e['stale_served']}/{e['requests']} requests"
        + (f", refused {e['refused']} (stale-if-error {e['stale_if_error']:g}s)"
           if e["refused"] else "")
    )  # fmt: skip
    end = [c for c in r["checks"] if c["label"].startswith("end")]
    if end:
        lines.append(
            "final checks: "
            + ("ok" if end[-1]["ok"] else "FAILED: " + "; ".join(end[-1]["problems"]))
        )
    for f in r["failures"]:
        lines.append(f"FAILURE: {f}")
    note = " (rejections seen, as they must be)" if s["misconfigure"] and r["passed"] else ""
    lines.append("RESULT: " + ("PASS" if r["passed"] else "FAIL") + note)
    return "\n".join(lines)
