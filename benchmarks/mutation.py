"""Mutation testing of the pure core (keymgr/planner.py, keymgr/transitions.py).

Runs mutmut 3 from a clean slate with the configuration in pyproject.toml
(``[tool.mutmut]``: which files are mutated, which tests judge them) and prints
the score: per file, mutants total / killed / survived / timeout / no tests,
and killed / (total - no tests), then every survivor. A benchmark-style figure,
not a CI step (benchmarks/README.md, "Mutation testing", records the last run
and why each survivor survives).

    .venv/bin/pip install 'mutmut==3.8.1'
    .venv/bin/python benchmarks/mutation.py            # run, then report (6-30 min)
    .venv/bin/python benchmarks/mutation.py --jobs 1   # fewer worker processes
    .venv/bin/python benchmarks/mutation.py --report   # report the last run only
    .venv/bin/mutmut show keymgr.planner.x_plan_ring__mutmut_42   # one mutant's diff

mutmut copies the source and the tests into ``mutants/`` (git-ignored) and
works there; this script deletes that directory first, so cached verdicts of
an older source never leak into the figure. The Hypothesis tests run with a
fixed seed (``--hypothesis-seed=0`` in the config) so every run sees the same
examples.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MUTANTS = REPO / "mutants"
FILES = ("keymgr/planner.py", "keymgr/transitions.py")

#: mutmut's exit-code classes (mutmut/stats.py), folded into the columns shown.
KILLED = {1, 3}
SURVIVED = {0}
NO_TESTS = {5, 33}
TIMEOUT = {36, -24, 24, 152, 255}


def classify(code: int | None) -> str:
    if code in KILLED:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    if code in TIMEOUT:
        return "timeout"
    if code is None:
        return "not checked"
    return "suspicious"


def run_mutmut(jobs: int) -> float:
    mutmut = Path(sys.executable).with_name("mutmut")
    if not mutmut.exists():
        sys.exit("mutmut is not in this virtualenv: .venv/bin/pip install 'mutmut==3.8.1'")
    shutil.rmtree(MUTANTS, ignore_errors=True)
    start = time.monotonic()
    proc = subprocess.run([str(mutmut), "run", "--max-children", str(jobs)], cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"mutmut run exited {proc.returncode}")
    return time.monotonic() - start


def results() -> dict[str, dict[str, str]]:
    """{file: {mutant name: status}} from mutmut's per-file result files."""
    out: dict[str, dict[str, str]] = {}
    for f in FILES:
        meta = MUTANTS / (f + ".meta")
        if not meta.exists():
            sys.exit(f"no results for {f} ({meta} missing): run without --report first")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[f] = {name: classify(code) for name, code in sorted(codes.items(), key=_order)}
    return out


def _order(item: tuple[str, object]) -> tuple[str, int]:
    name = item[0]
    func, _, n = name.rpartition("__mutmut_")
    return func, int(n) if n.isdigit() else 0


def score(counts: Counter[str]) -> float:
    judged = sum(counts.values()) - counts["no tests"]
    return 100.0 * counts["killed"] / judged if judged else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="mutmut worker processes (default 2)")
    ap.add_argument("--report", action="store_true", help="report the last run, do not run")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()

    elapsed = None if args.report else run_mutmut(args.jobs)
    res = results()
    cols = ("killed", "survived", "timeout", "no tests", "suspicious", "not checked")
    rows = {f: Counter(r.values()) for f, r in res.items()}
    total = sum(rows.values(), Counter())

    print()
    print(f"mutmut {metadata.version('mutmut')}, Python {sys.version.split()[0]}", end="")
    print(f", {elapsed / 60:.0f} min with {args.jobs} workers" if elapsed else "")
    print()
    print("| file | mutants | " + " | ".join(cols) + " | score |")
    print("| --- | ---: | " + " | ".join("---:" for _ in cols) + " | ---: |")
    for name, c in [*rows.items(), ("**total**", total)]:
        cells = " | ".join(str(c[k]) for k in cols)
        print(f"| {name} | {sum(c.values())} | {cells} | {score(c):.1f}% |")
    print()
    print("score = killed / (mutants - no tests); a timeout counts as not killed.")
    left = [(n, s) for r in res.values() for n, s in r.items() if s not in ("killed", "no tests")]
    if left:
        print()
        print("Not killed (`.venv/bin/mutmut show NAME` prints the diff):")
        for n, s in left:
            print(f"  {s:9} {n}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "mutmut": metadata.version("mutmut"),
                    "seconds": elapsed,
                    "files": {f: dict(c) for f, c in rows.items()},
                    "score": {f: round(score(c), 1) for f, c in [*rows.items(), ("total", total)]},
                    "not_killed": dict(left),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
