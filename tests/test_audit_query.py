"""Audit queries and ``keymgr audit follow`` (issue 16).

- ``audit show`` filters (time window, event globs, actor, ring, kid, limit,
  reverse) against a log made by real keymgr commands (rotations with ``--at``,
  several actors), every filter and combinations checked against a plain
  Python filter of the parsed log; bad input is one line, exit 2.
- Speed: a synthetic log of 10^5 lines sealed with keymgr's own chain function
  (so it verifies) is queried through a reader that counts bytes: ``--since``
  bisects (reads a small fraction of the file), ``--reverse --limit`` reads the
  end only. Times that go back a little (as daemon events can) give exact
  answers; times that go back by more than the slack are reported, and
  ``--scan`` reads every line. The 10^6-line timing is benchmarks/bench_audit.py.
- ``audit follow`` in a subprocess: events appended by keymgr commands are
  printed once verified; a forged or tampered line, a truncated, rewritten or
  replaced log ends it with exit 1 naming the line; signed checkpoints are
  required when ``[audit]`` is on; the syslog and journald sockets (real unix
  datagram servers here) receive structured records.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keymgr.audit import GENESIS, AuditLog, chain_hash, seal
from keymgr.auditquery import SLACK, Query, line_ts, parse_when, query_file
from keymgr.model import AuditAnchor
from keymgr.timefmt import format_time, parse_time
from tests.conftest import SHORT_POLICY, T0, A, D, G, Home, P

AT = format_time


def ts(dt: datetime) -> str:
    text = format_time(dt)
    assert text is not None
    return text


# --------------------------------------------------------------------------- a real log


class Drill(Home):
    @property
    def log(self) -> Path:
        return self.dir / "audit.jsonl"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_bytes().splitlines()]

    def as_user(self, user: str, *args: str) -> None:
        proc = self.run(*args, env=self.env(LOGNAME=user, USER=user))
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)

    def show(self, *args: str) -> list[dict[str, Any]]:
        proc = self.run("audit", "show", "--json", *args, inproc=True)
        assert proc.returncode == 0, (args, proc.stderr)
        return [json.loads(x) for x in proc.stdout.splitlines()]


def make_home(d: Path) -> Drill:
    subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "init", "--dir", str(d)],
        check=True, capture_output=True,
    )
    h = Drill(d)
    h.set_ring("default", **SHORT_POLICY)
    with h.config.open("a") as f:
        f.write('\n[keyrings.api]\nbackend = "local"\nalgorithm = "ES256"\n'
                + "".join(f'{k} = "{v}"\n' for k, v in SHORT_POLICY.items())
                + 'publishers = ["site"]\n')
    return h


@pytest.fixture(scope="module")
def drilled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two rings through about three rotations, by alice, bob and the daemon's
    actor, with a revocation: every event a rotation makes."""
    from keymgr.manager import KeyManager

    h = make_home(tmp_path_factory.mktemp("drill") / "home")
    h.as_user("alice", "reconcile", "--at", AT(T0))
    h.as_user("bob", "rotate", "api", "--at", AT(T0 + timedelta(days=1)))
    h.as_user("alice", "reconcile", "--at", AT(T0 + timedelta(days=1) + A))
    h.as_user("bob", "revoke", h.kid_in("active", "default"), "--reason", "leaked\nkey",
              "--at", AT(T0 + timedelta(days=2)))
    daemon = KeyManager.from_config(h.config, actor="daemon")
    for at in (T0 + P - A, T0 + P, T0 + P + G, T0 + P + G + D, T0 + 2 * P - A, T0 + 2 * P,
               T0 + 2 * P + G + D, T0 + 3 * P):
        daemon.reconcile(at)
    h.as_user("alice", "reconcile", "--at", AT(T0 + 3 * P + G + D))
    assert h.run("audit", "verify").returncode == 0
    return h.dir


@pytest.fixture
def drilled(drilled_dir: Path) -> Drill:
    return Drill(drilled_dir)


def reference(
    events: list[dict[str, Any]],
    since: datetime | None = None,
    until: datetime | None = None,
    event: tuple[str, ...] = (),
    actor: str | None = None,
    ring: str | None = None,
    kid: str | None = None,
    limit: int | None = None,
    reverse: bool = False,
) -> list[int]:
    """What ``show`` must answer, by the plainest filter there is (the logs
    here hold times as keymgr writes them, which compare as text)."""
    lo, hi = (None if t is None else ts(t) for t in (since, until))
    out = [
        e for e in events
        if (lo is None or e["ts"] >= lo)
        and (hi is None or e["ts"] <= hi)
        and (not event or any(fnmatch.fnmatchcase(e["event"], p) for p in event))
        and (actor is None or fnmatch.fnmatchcase(e.get("actor", ""), actor))
        and (ring is None or e.get("ring") == ring)
        and (kid is None or e.get("kid") == kid)
    ]
    if reverse:
        out.reverse()
    return [e["seq"] for e in out[:limit]]


def test_the_drill_made_a_varied_log(drilled: Drill) -> None:
    evs = drilled.events()
    actors = {e["actor"].split("@")[0] for e in evs}
    assert actors == {"cli:alice", "cli:bob", "daemon"}, actors
    names = {e["event"] for e in evs}
    assert {"key.generated", "key.published", "key.promoted", "key.retired", "key.expired",
            "key.destroyed", "key.revoked", "rotate.requested", "jwks.published"} <= names
    assert {e["ring"] for e in evs if "ring" in e} == {"default", "api"}
    times = [e["ts"] for e in evs]
    assert times == sorted(times)  # keymgr's own commands never date an event back
    assert len(evs) > 40


def _cases(evs: list[dict[str, Any]]) -> dict[str, tuple[list[str], dict[str, Any]]]:
    revoked = next(e for e in evs if e["event"] == "key.revoked")
    kid = revoked["kid"]
    api_kid = next(e["kid"] for e in evs if e.get("ring") == "api")
    mid = parse_time(evs[len(evs) // 2]["ts"])
    t1, t2 = T0 + timedelta(days=1), T0 + P + G
    return {
        "all": ([], {}),
        "since": (["--since", ts(mid)], {"since": mid}),
        "since-exact-boundary": (["--since", ts(t2)], {"since": t2}),
        "until": (["--until", ts(mid)], {"until": mid}),
        "window": (["--since", ts(t1), "--until", ts(t2)], {"since": t1, "until": t2}),
        "window-one-instant": (["--since", ts(t2), "--until", ts(t2)], {"since": t2, "until": t2}),
        "since-offset-zone": (["--since", "2031-03-11T09:00:00+01:00"],
                              {"since": T0 + P}),
        "since-duration": (["--since", "3650d"], {}),  # now - 10 years: the whole (2031) log
        "until-duration": (["--until", "1s"], {"until": datetime(2000, 1, 1, tzinfo=UTC)}),
        "event": (["--event", "key.revoked"], {"event": ("key.revoked",)}),
        "event-glob": (["--event", "key.*"], {"event": ("key.*",)}),
        "event-glob-class": (["--event", "key.[ep]*"], {"event": ("key.[ep]*",)}),
        "events": (["--event", "key.promoted", "--event", "rotate.*"],
                   {"event": ("key.promoted", "rotate.*")}),
        "actor": (["--actor", "daemon"], {"actor": "daemon"}),
        "actor-glob": (["--actor", "cli:*"], {"actor": "cli:*"}),
        "actor-none": (["--actor", "cli"], {"actor": "cli"}),
        "ring": (["--ring", "api"], {"ring": "api"}),
        "ring-unknown": (["--ring", "nope"], {"ring": "nope"}),
        "kid": (["--kid", kid], {"kid": kid}),
        "limit": (["--limit", "5"], {"limit": 5}),
        "reverse": (["--reverse"], {"reverse": True}),
        "reverse-limit": (["--reverse", "--limit", "3"], {"reverse": True, "limit": 3}),
        "ring-event-window-reverse-limit": (
            ["--ring", "default", "--event", "key.*", "--since", ts(t1), "--until", ts(t2 + P),
             "--reverse", "--limit", "4"],
            {"ring": "default", "event": ("key.*",), "since": t1, "until": t2 + P,
             "reverse": True, "limit": 4}),
        "kid-events": (["--kid", kid, "--event", "key.retired", "--event", "key.revoked",
                        "--event", "key.destroyed"],
                       {"kid": kid, "event": ("key.retired", "key.revoked", "key.destroyed")}),
        "actor-ring-since": (["--actor", "daemon", "--ring", "api", "--since", ts(mid)],
                             {"actor": "daemon", "ring": "api", "since": mid}),
        "api-kid-reverse": (["--kid", api_kid, "--reverse"], {"kid": api_kid, "reverse": True}),
        "scan-window": (["--since", ts(t1), "--until", ts(t2), "--scan"],
                        {"since": t1, "until": t2}),
        "nothing": (["--ring", "api", "--event", "key.revoked"],
                    {"ring": "api", "event": ("key.revoked",)}),
    }


CASE_NAMES = [
    "all", "since", "since-exact-boundary", "until", "window", "window-one-instant",
    "since-offset-zone", "since-duration", "until-duration", "event", "event-glob",
    "event-glob-class", "events", "actor", "actor-glob", "actor-none", "ring", "ring-unknown",
    "kid", "limit", "reverse", "reverse-limit", "ring-event-window-reverse-limit", "kid-events",
    "actor-ring-since", "api-kid-reverse", "scan-window", "nothing",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_show_filters_match_a_plain_filter(drilled: Drill, case: str) -> None:
    evs = drilled.events()
    args, ref = _cases(evs)[case]
    got = drilled.show(*args)
    assert [e["seq"] for e in got] == reference(evs, **ref), args
    # --json prints the lines as stored, byte for byte
    stored = {e["seq"]: line for e, line in zip(evs, drilled.log.read_bytes().splitlines(),
                                                strict=True)}
    proc = drilled.run("audit", "show", "--json", *args, inproc=True)
    assert [stored[e["seq"]].decode() for e in got] == proc.stdout.splitlines()


def test_every_case_selects_something_or_nothing_on_purpose(drilled: Drill) -> None:
    evs = drilled.events()
    for name, (_, ref) in _cases(evs).items():
        n = len(reference(evs, **ref))
        if name in ("until-duration", "actor-none", "ring-unknown", "nothing"):
            assert n == 0, name
        else:
            assert n > 0, name
        if name not in ("all", "since-duration", "reverse"):
            assert n < len(evs), name


def test_show_table_is_aligned_and_one_line_per_event(drilled: Drill) -> None:
    proc = drilled.run("audit", "show", "--ring", "default", "--event", "key.*", check=True)
    lines = proc.stdout.splitlines()
    head = lines[0].split()
    assert head == ["SEQ", "TIME", "EVENT", "RING", "KID", "ACTOR", "DETAILS"]
    cols = [lines[0].index(h) for h in head]
    expected = reference(drilled.events(), ring="default", event=("key.*",))
    assert len(lines) == 1 + len(expected)
    for line, seq in zip(lines[1:], expected, strict=True):
        assert line.split()[0] == str(seq)
        for c in cols[1:]:
            if c < len(line):  # an empty last cell is left out
                assert line[c - 2 : c] == "  " and line[c] != " ", (line, c)
    # A reason with a newline stays on its row, escaped.
    revoked = [x for x in lines if "key.revoked" in x]
    assert len(revoked) == 1 and "reason=leaked\\nkey" in revoked[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--since", "yesterday"], "argument --since: bad time 'yesterday'"),
        (["--until", "2031-13-01T00:00:00Z"], "argument --until: bad time"),
        (["--since", "2031-03-01T00:00:00"], "argument --since: bad time"),  # no zone
        (["--since", "3651d"], "argument --since: bad time"),
        (["--limit", "0"], "argument --limit"),
        (["--limit", "x"], "argument --limit"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--since", "2031-03-02T00:00:00Z", "--until", "2031-03-01T00:00:00Z"],
         "--since is after --until"),
    ],
)
def test_bad_input_is_one_line_exit_2(drilled: Drill, args: list[str], needle: str) -> None:
    proc = drilled.run("audit", "show", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_parse_when_durations_count_back_from_now() -> None:
    now = datetime(2031, 3, 8, 0, 0, tzinfo=UTC)
    assert parse_when("7d", now) == datetime(2031, 3, 1, tzinfo=UTC)
    assert parse_when("1h30m", now) == now - timedelta(minutes=90)
    assert parse_when("2031-03-01T01:00:00+01:00") == datetime(2031, 3, 1, tzinfo=UTC)


def test_show_does_not_verify(tmp_path: Path, drilled: Drill) -> None:
    """Documented: show filters what is there; audit verify is the check."""
    h = Drill(tmp_path / "home")
    shutil.copytree(drilled.dir, h.dir, symlinks=True)
    lines = h.log.read_bytes().splitlines(keepends=True)
    edited = json.loads(lines[2])
    edited["reason"] = "edited"
    lines[2] = json.dumps(edited, separators=(",", ":")).encode() + b"\n"
    h.log.write_bytes(b"".join(lines) + b'{"ts":"2031-03-01T08:00:00Z","seq":')  # torn tail
    assert h.run("audit", "verify").returncode == 1
    got = h.show()
    assert got[2]["reason"] == "edited" and len(got) == len(lines)  # torn tail ignored
    # A line that is not JSON at all is named (by byte offset) when reached.
    h.log.write_bytes(b"".join(lines[:3]) + b"garbage\n" + b"".join(lines[3:]))
    proc = h.run("audit", "show")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "not an audit event" in proc.stderr and "audit verify" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert [e["seq"] for e in h.show("--reverse", "--limit", "2")] == [
        json.loads(lines[-1])["seq"], json.loads(lines[-2])["seq"]]


def test_show_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    h = make_home(tmp_path / "home")
    assert h.show() == [] and h.show("--reverse", "--since", "1d") == []


# --------------------------------------------------------------------------- a synthetic log

T_SYN = datetime(2031, 1, 1, tzinfo=UTC)
NAMES = ("key.generated", "jwks.published", "key.published", "key.promoted", "key.retired",
         "edge.updated")
ACTORS = ("daemon", "cli:alice@h1", "cli:bob@h2")


def synthetic_events(n: int, back: dict[int, timedelta] | None = None) -> Iterator[dict[str, Any]]:
    """``n`` events 30 s apart; every 997th a ``daemon.started`` dated 45 s
    before the line ahead of it (the wall clock of a daemon event); ``back``
    moves more lines back."""
    back = back or {}
    for i in range(n):
        t = T_SYN + timedelta(seconds=30 * i)
        if i % 997 == 996:
            yield {"event": "daemon.started", "ts": ts(t - timedelta(seconds=75)),
                   "actor": "daemon", "reason": "start"}
            continue
        if i in back:
            t -= back[i]
        kid = base64.urlsafe_b64encode(hashlib.sha256(b"%d" % (i // 6)).digest())
        yield {"event": NAMES[i % 6], "ts": ts(t), "ring": f"r{(i // 6) % 10}",
               "kid": kid.rstrip(b"=").decode(), "backend": "local",
               "actor": ACTORS[(i // 50) % 3], "reason": "scheduled"}


def write_synthetic(path: Path, n: int, back: dict[int, timedelta] | None = None) -> AuditAnchor:
    """Seal the events with keymgr's own chain (``keymgr.audit.seal``) and
    write them as keymgr appends them: a log that ``audit verify`` accepts."""
    seq, prev = 0, GENESIS
    batch: list[dict[str, Any]] = []
    with open(path, "wb") as f:
        def flush() -> None:
            nonlocal seq, prev
            sealed = seal(batch, seq, prev, "daemon")
            f.write(b"".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode()
                             + b"\n" for e in sealed))
            seq, prev = sealed[-1]["seq"], sealed[-1]["hash"]
            batch.clear()

        for ev in synthetic_events(n, back):
            batch.append(ev)
            if len(batch) == 1000:
                flush()
        if batch:
            flush()
    return AuditAnchor(seq=seq, hash=prev)


class Counting:
    """A file that counts what a query reads."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb", buffering=0)  # noqa: SIM115
        self.bytes = 0
        self.reads = 0

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return self.f.seek(offset, whence)

    def read(self, size: int = -1, /) -> bytes:
        data = self.f.read(size)
        self.bytes += len(data)
        self.reads += 1
        return data

    def close(self) -> None:
        self.f.close()


N_SYN = 100_000


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    path = tmp_path_factory.mktemp("synthetic") / "audit.jsonl"
    anchor = write_synthetic(path, N_SYN)
    assert anchor.seq == N_SYN
    events = [json.loads(x) for x in path.read_bytes().splitlines()]
    return path, events


def run_query(path: Path, q: Query) -> tuple[list[int], Counting, list[str]]:
    warnings: list[str] = []
    f = Counting(path)
    try:
        seqs = [h.event["seq"] for h in query_file(f, path.stat().st_size, q, "log",
                                                    warnings.append)]
    finally:
        f.close()
    return seqs, f, warnings


def test_synthetic_log_verifies(synthetic: tuple[Path, list[dict[str, Any]]]) -> None:
    path, events = synthetic
    last = events[-1]
    assert AuditLog(path).verify(AuditAnchor(seq=last["seq"], hash=last["hash"])) == N_SYN
    assert chain_hash(events[-2]["hash"], last) == last["hash"]
    # its times go back a little, as a daemon's can
    assert sum(a["ts"] > b["ts"] for a, b in itertools.pairwise(events)) > 90


def test_since_bisects_instead_of_reading_the_log(
    synthetic: tuple[Path, list[dict[str, Any]]]
) -> None:
    path, events = synthetic
    size = path.stat().st_size
    since = parse_time(events[-200]["ts"])
    seqs, f, warnings = run_query(path, Query(since=since))
    assert seqs == reference(events, since=since)
    assert 200 <= len(seqs) < 260 and not warnings
    # the last day (the slack) read in 1 MiB, ~10 probes of 4 KiB: a few % of 33 MB
    assert f.bytes < 2 * 2**20 < size // 15, (f.bytes, size)
    assert f.reads < 80, f.reads
    # a narrow window in the middle: only around it is read
    t1, t2 = parse_time(events[50_000]["ts"]), parse_time(events[50_100]["ts"])
    seqs, f, _ = run_query(path, Query(since=t1, until=t2))
    assert seqs == reference(events, since=t1, until=t2) and len(seqs) > 90
    assert f.bytes < 5 * 2**20 < size // 6, (f.bytes, size)
    # the same without seeking reads everything
    seqs2, f2, _ = run_query(path, Query(since=t1, until=t2, scan=True))
    assert seqs2 == seqs and f2.bytes >= size


def test_reverse_limit_reads_the_end_only(synthetic: tuple[Path, list[dict[str, Any]]]) -> None:
    path, events = synthetic
    seqs, f, _ = run_query(path, Query(reverse=True, limit=10))
    assert seqs == list(range(N_SYN, N_SYN - 10, -1))
    assert f.bytes < 200_000, f.bytes
    until = parse_time(events[30_000]["ts"])
    seqs, f, _ = run_query(path, Query(reverse=True, limit=5, until=until, ring="r3"))
    assert seqs == reference(events, until=until, ring="r3", reverse=True, limit=5)
    assert f.bytes < 3 * 2**20 < path.stat().st_size // 10


def test_random_queries_match_a_plain_filter(
    synthetic: tuple[Path, list[dict[str, Any]]]
) -> None:
    """Windows whose edges fall anywhere, including on a daemon event dated
    back (the lines before it that are later than it must be found too)."""
    path, events = synthetic
    rnd = random.Random(16)
    starts = [i for i, e in enumerate(events) if e["event"] == "daemon.started"]
    for k in range(30):
        i = rnd.choice(starts) if k % 3 == 0 else rnd.randrange(N_SYN)
        j = min(N_SYN - 1, i + rnd.choice((0, 1, 3, 50, 2000, 40_000)))
        since = parse_time(events[i]["ts"]) if k % 5 != 4 else None
        until = parse_time(events[j]["ts"]) if k % 4 != 3 else None
        ref: dict[str, Any] = {"since": since, "until": until, "reverse": k % 2 == 1}
        if k % 6 == 2:
            ref["ring"] = f"r{rnd.randrange(10)}"
        if k % 7 == 3:
            ref["event"] = ("key.p*", "daemon.*")
        if k % 8 == 5:
            ref["actor"] = "cli:*"
        if k % 3 == 1:
            ref["limit"] = rnd.choice((1, 7, 100))
        q = Query(since=since, until=until, events=ref.get("event", ()),
                  actor=ref.get("actor"), ring=ref.get("ring"), limit=ref.get("limit"),
                  reverse=ref["reverse"])
        seqs, _, warnings = run_query(path, q)
        assert seqs == reference(events, **ref), (k, ref)
        assert not warnings


def test_untimed_filters_find_every_line_however_it_is_spelled(
    synthetic: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Without a time, a scan skips to the lines holding the kid (or ring,
    event, actor) as keymgr writes it; a line spelling it with JSON escapes
    is still found."""
    path, events = synthetic
    kid = events[77_777]["kid"]
    for q, ref in [
        (Query(kid=kid), {"kid": kid}),
        (Query(kid=kid, reverse=True, limit=2), {"kid": kid, "reverse": True, "limit": 2}),
        (Query(ring="r7", events=("key.promoted",), limit=50),
         {"ring": "r7", "event": ("key.promoted",), "limit": 50}),
        (Query(events=("daemon.*",), reverse=True), {"event": ("daemon.*",), "reverse": True}),
        (Query(actor="cli:bob@*", kid=kid), {"actor": "cli:bob@*", "kid": kid}),
    ]:
        assert run_query(path, q)[0] == reference(events, **ref), ref
    small = tmp_path / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)[:3000]
    ev = json.loads(lines[1000])
    kid2 = ev["kid"]
    spelled = f'"{kid2[:-1]}\\u{ord(kid2[-1]):04x}"'  # the same string, one escape
    escaped = json.dumps(ev, separators=(",", ":")).replace(f'"{kid2}"', spelled)
    assert json.loads(escaped) == ev and ev["kid"].encode() not in escaped.encode()
    small.write_bytes(b"".join(lines) + escaped.encode() + b"\n")
    for reverse in (False, True):
        seqs = run_query(small, Query(kid=ev["kid"], reverse=reverse))[0]
        assert seqs.count(ev["seq"]) == 2, seqs  # the original line and its escaped copy


def test_times_going_back_beyond_the_slack_are_noticed(tmp_path: Path) -> None:
    """A drill left the state's clock days ahead, then a daemon recorded its
    own (wall clock) events: where the seek lands next to them, the whole log
    is read; where a scan meets them, a warning says so; --scan is exact."""
    path = tmp_path / "audit.jsonl"
    n = 6000
    back = {i: SLACK * 3 for i in range(3000, 3004)}
    write_synthetic(path, n, back)
    events = [json.loads(x) for x in path.read_bytes().splitlines()]
    since = parse_time(events[2950]["ts"])
    exact = reference(events, since=since)
    assert len(exact) == n - 2950 - 4
    seqs, _, warnings = run_query(path, Query(since=since, scan=True))
    assert seqs == exact and not warnings
    # the same query with seeking: the step is next to where it lands, or on
    # the way: the answer is still exact, and the warning says why
    seqs, _, warnings = run_query(path, Query(since=since))
    assert seqs == exact, (len(seqs), len(exact))
    assert len(warnings) == 1 and "go back by more than 1d near byte" in warnings[0], warnings
    # times that go back inside what a query reads are reported
    t_back = parse_time(events[3001]["ts"])
    seqs, _, warnings = run_query(path, Query(since=t_back - timedelta(hours=1)))
    assert warnings and "go back by more than 1d" in warnings[0], warnings
    assert seqs == reference(events, since=t_back - timedelta(hours=1))
    # a step far from anything a seek reads cannot be seen: --scan is exact
    q = Query(until=t_back, reverse=True, scan=True)
    assert run_query(path, q)[0] == reference(events, until=t_back, reverse=True) == [
        3002, 3001]


def test_line_ts_reads_the_prefix_and_falls_back_to_json() -> None:
    assert line_ts(b'{"ts":"2031-01-01T00:00:00Z","seq":1}') == "2031-01-01T00:00:00Z"
    assert line_ts(b'{"seq":1,"ts":"2031-01-01T01:00:00+01:00"}') == "2031-01-01T00:00:00Z"
    # a repeated key is read as JSON reads it (the last one wins)
    assert line_ts(b'{"ts":"2031-01-01T00:00:00Z","ts":"2032-01-01T00:00:00Z"}') == (
        "2032-01-01T00:00:00Z")
    assert line_ts(b"not json") is None and line_ts(b'{"seq":1}') is None


def test_show_json_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    h = make_home(tmp_path / "home")
    write_synthetic(h.log, 20_000)
    proc = subprocess.run(
        f"{sys.executable} -m keymgr.cli --config {h.config} audit show --json | head -n 1",
        shell=True, capture_output=True, text=True, cwd=h.dir, env=h.env(), timeout=120,
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["seq"] == 1
    assert proc.stderr == ""


# --------------------------------------------------------------------------- follow


class Follow:
    """``keymgr audit follow`` in a subprocess, its stdout and stderr read as they come."""

    def __init__(self, h: Home, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keymgr.cli", "--config", str(h.config), "audit", "follow",
             "--interval", "0.05", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=h.dir, env=h.env(),
        )
        self.out = b""
        self.err = b""
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(stream.fileno(), False)
            self.sel.register(stream, selectors.EVENT_READ)

    def _pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            data = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
            if not data:
                self.sel.unregister(key.fileobj)
                continue
            if key.fileobj is self.proc.stdout:
                self.out += data
            else:
                self.err += data

    def wait_for(self, what: str, stream: str = "err", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while what.encode() not in getattr(self, stream):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what!r} not seen\nstdout: {self.out!r}\n"
                                     f"stderr: {self.err!r}")
            if self.proc.poll() is not None and not self.sel.get_map():
                raise AssertionError(f"exited {self.proc.returncode} before {what!r}\n"
                                     f"stdout: {self.out!r}\nstderr: {self.err!r}")
            self._pump(0.1)

    def lines(self) -> list[bytes]:
        return self.out.splitlines()

    def wait_lines(self, n: int, timeout: float = 60) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.lines()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} lines not seen\nstdout: {self.out!r}\n"
                                     f"stderr: {self.err!r}")
            self._pump(0.1)
        return self.lines()

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or self.sel.get_map():
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"still running\nstdout: {self.out!r}\nstderr: {self.err!r}")
            self._pump(0.1)
        return self.proc.returncode

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.exit_code(30) if self.proc.poll() is None else self.proc.returncode
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def error(self) -> str:
        lines = [x for x in self.err.decode().splitlines() if x.startswith("keymgr: error: ")]
        assert len(lines) == 1, self.err
        return lines[0]


@pytest.fixture
def fhome(tmp_path: Path) -> Iterator[Drill]:
    h = make_home(tmp_path / "home")
    assert h.run("reconcile", "--at", AT(T0), inproc=True).returncode == 0
    yield h


FOLLOWERS: list[Follow] = []


@pytest.fixture(autouse=True)
def _stop_followers() -> Iterator[None]:
    yield
    while FOLLOWERS:
        FOLLOWERS.pop().stop()


def follow(h: Home, *args: str) -> Follow:
    fo = Follow(h, *args)
    FOLLOWERS.append(fo)
    return fo


def test_follow_prints_new_events_once_verified(fhome: Drill) -> None:
    h = fhome
    n0 = len(h.events())
    fo = follow(h, "--json")
    fo.wait_for(f"following from line {n0} (the head anchored in state)")
    assert fo.out == b""  # from the end by default
    h.run("rotate", "api", "--at", AT(T0 + timedelta(days=1)), inproc=True, check=True)
    h.run("reconcile", "--at", AT(T0 + timedelta(days=1) + A), inproc=True, check=True)
    stored = h.log.read_bytes().splitlines()
    assert len(stored) > n0 + 3
    assert fo.wait_lines(len(stored) - n0) == stored[n0:]  # as stored, in order
    assert fo.stop() == 0
    assert "error" not in fo.err.decode()


def test_follow_from_start_verifies_and_prints_the_log_then_follows(fhome: Drill) -> None:
    h = fhome
    before = h.log.read_bytes().splitlines()
    fo = follow(h, "--from-start")
    fo.wait_for("existing line(s) verified, anchored in state")
    h.run("revoke", h.kid_in("active", "api"), "--reason", "test", "--at",
          AT(T0 + timedelta(hours=2)), inproc=True, check=True)
    after = h.log.read_bytes().splitlines()
    lines = fo.wait_lines(1 + len(after))
    assert lines[0].split() == [b"SEQ", b"TIME", b"EVENT", b"RING", b"KID", b"ACTOR",
                                b"DETAILS"]
    assert [int(x.split()[0]) for x in lines[1:]] == list(range(1, len(after) + 1))
    assert len(after) > len(before)
    assert any(b"key.revoked" in x for x in lines[len(before) + 1 :])
    assert fo.stop() == 0


def _forged(h: Drill) -> dict[str, Any]:
    """A line chained after the log's last one, as anyone can make it."""
    last = json.loads(h.log.read_bytes().splitlines()[-1])
    ev = {"ts": last["ts"], "seq": last["seq"] + 1, "event": "key.revoked", "ring": "api",
          "kid": last.get("kid", "x"), "actor": "cli:mallory@x", "reason": "forged",
          "prev": last["hash"]}
    ev["hash"] = chain_hash(last["hash"], ev)
    return ev


def _append(h: Drill, ev: dict[str, Any]) -> int:
    with h.log.open("ab") as f:
        f.write(json.dumps(ev, separators=(",", ":")).encode() + b"\n")
    return int(ev["seq"])


def _forge_chained(h: Drill) -> int:
    return _append(h, _forged(h))


def test_follow_stops_at_a_forged_line_appended(fhome: Drill) -> None:
    """Chained correctly, but never committed: the state does not anchor it."""
    h = fhome
    fo = follow(h, "--json")
    fo.wait_for("following from line")
    n = _forge_chained(h)
    assert fo.exit_code() == 1
    err = fo.error()
    assert f"line {n}: beyond the head anchored in state" in err, err
    assert fo.out == b""  # never printed


def test_follow_stops_at_a_line_tampered_before_it_is_read(fhome: Drill) -> None:
    """A line written in two parts (as keymgr's append does), its second part
    altered: the line as read does not hash to its recorded hash."""
    h = fhome
    fo = follow(h)
    fo.wait_for("following from line")
    last = json.loads(h.log.read_bytes().splitlines()[-1])
    ev = {"ts": last["ts"], "seq": last["seq"] + 1, "event": "rotate.requested", "ring": "api",
          "actor": "cli:alice@x", "prev": last["hash"]}
    ev["hash"] = chain_hash(last["hash"], ev)
    line = json.dumps(ev, separators=(",", ":")).encode()
    with h.log.open("ab") as f:
        f.write(line[:40])
        f.flush()
        time.sleep(0.5)
        f.write(line[40:].replace(b"alice", b"mallo") + b"\n")
    assert fo.exit_code() == 1
    assert f"line {ev['seq']}: hash mismatch (line edited)" in fo.error()


def test_follow_detects_truncation(fhome: Drill) -> None:
    h = fhome
    fo = follow(h, "--json")
    fo.wait_for("following from line")
    data = h.log.read_bytes()
    with h.log.open("r+b") as f:
        f.truncate(len(data) - len(data.splitlines(keepends=True)[-1]))
    assert fo.exit_code() == 1
    assert "truncated to" in fo.error() and "was cut" in fo.error()


def test_follow_detects_the_last_line_rewritten_in_place(fhome: Drill) -> None:
    h = fhome
    fo = follow(h, "--json")
    fo.wait_for("following from line")
    data = bytearray(h.log.read_bytes())
    i = data.rindex(b'"actor":"cli:') + len(b'"actor":"cli:')
    data[i:i + 1] = b"X"
    with h.log.open("r+b") as f:  # same file, same size, then it grows
        f.write(bytes(data))
        f.write(b"\n")
    assert fo.exit_code() == 1
    n = len(data.splitlines())
    assert f"line {n}: changed after it was verified" in fo.error()


def test_follow_survives_a_copy_put_back_and_refuses_a_shorter_one(fhome: Drill) -> None:
    """tail -F: the path reopened; the new file must hold every line verified."""
    h = fhome
    n0 = len(h.events())
    fo = follow(h, "--json")
    fo.wait_for("following from line")
    moved = h.log.with_name("audit.jsonl.1")
    h.log.rename(moved)
    fo.wait_for("gone (renamed or removed)")
    shutil.copy(moved, h.log.with_name("copy"))  # a new inode with the same lines
    os.replace(h.log.with_name("copy"), h.log)
    fo.wait_for(f"a file is back at the path, holding lines 1-{n0}")
    h.run("rotate", "default", "--at", AT(T0 + timedelta(days=1)), inproc=True, check=True)
    stored = h.log.read_bytes().splitlines()
    assert fo.wait_lines(len(stored) - n0) == stored[n0:]
    # now a rotation that keeps only the last line: history cut
    tmp = h.log.with_name("audit.new")
    tmp.write_bytes(stored[-1] + b"\n")
    os.replace(tmp, h.log)
    assert fo.exit_code() == 1
    assert "replaced by a file" in fo.error() and "history was cut" in fo.error()


def test_follow_waits_for_a_log_not_written_yet(tmp_path: Path) -> None:
    h = make_home(tmp_path / "home")
    fo = follow(h, "--json")
    fo.wait_for("following from line 0")
    h.run("reconcile", "--at", AT(T0), inproc=True, check=True)
    fo.wait_for("created; following")
    stored = h.log.read_bytes().splitlines()
    assert fo.wait_lines(len(stored)) == stored
    assert fo.stop() == 0


def test_follow_refuses_to_start_on_a_log_not_at_its_anchor(fhome: Drill) -> None:
    h = fhome
    _forge_chained(h)
    fo = follow(h)
    assert fo.exit_code() == 1
    assert "not committed by keymgr" in fo.error()
    fo = follow(h, "--from-start")
    assert fo.exit_code() == 1
    assert "beyond the head anchored in state" in fo.error()


def _add_audit(h: Home) -> None:
    with h.config.open("a") as f:
        f.write('\n[audit]\nbackend = "local"\nalgorithm = "ES256"\n')


def test_follow_with_checkpoints_requires_them(tmp_path: Path) -> None:
    """[audit]: the start is the signed head; a line appended *and* anchored
    by someone who can write the log and the state, but not use the audit
    key, is refused at once."""
    h = make_home(tmp_path / "home")
    _add_audit(h)
    h.run("reconcile", "--at", AT(T0), inproc=True, check=True)
    n0 = len(h.events())
    fo = follow(h, "--json")
    fo.wait_for("signed by audit key")
    h.run("rotate", "api", "--at", AT(T0 + timedelta(days=1)), inproc=True, check=True)
    stored = h.log.read_bytes().splitlines()
    assert fo.wait_lines(len(stored) - n0) == stored[n0:]
    assert "ckpt_sig" in json.loads(stored[-1])
    whole = follow(h, "--from-start", "--json")
    assert whole.wait_lines(len(stored)) == stored
    whole.wait_for("signed through line")
    assert whole.stop() == 0
    forged = _forged(h)
    doc = h.state()  # the state first, as keymgr commits: then the line
    doc["audit"].update(seq=forged["seq"], hash=forged["hash"], outbox=[forged])
    (h.dir / "state.json").write_text(json.dumps(doc))
    n = _append(h, forged)
    assert fo.exit_code() == 1
    assert f"line {n}: not covered by a signed checkpoint" in fo.error()
    assert len(fo.lines()) == len(stored) - n0  # the forged line never printed
    # --from-start checks the signatures with the keys the log introduces
    fo = follow(h, "--from-start")
    assert fo.exit_code() == 1
    assert f"line {n}: not covered by a signed checkpoint" in fo.error()


def _datagram_server(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(30)
    return s


def _journal(data: bytes) -> dict[str, str]:
    """journald's native datagram, parsed (both field forms)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            out[line.decode()] = data[nl + 9 : nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return out


def test_follow_sends_structured_records_to_syslog_and_journald(fhome: Drill) -> None:
    h = fhome
    d = tempfile.mkdtemp(prefix="km-", dir="/tmp")  # unix socket paths are short
    try:
        syslog, journal = _datagram_server(f"{d}/log"), _datagram_server(f"{d}/journal")
        n0 = len(h.events())
        fo = follow(h, "--json", "--syslog-socket", f"{d}/log", "--journal-socket",
                    f"{d}/journal")
        fo.wait_for("following from line")
        h.run("revoke", h.kid_in("active", "api"), "--reason", "two\nlines", "--at",
              AT(T0 + timedelta(hours=3)), inproc=True, check=True)
        stored = h.log.read_bytes().splitlines()[n0:]
        fo.wait_lines(len(stored))
        records = [_journal(journal.recv(65536)) for _ in stored]
        lines = [syslog.recv(65536).decode() for _ in stored]
    finally:
        shutil.rmtree(d)
    for raw, rec, line in zip(stored, records, lines, strict=True):
        ev = json.loads(raw)
        assert rec["SYSLOG_IDENTIFIER"] == "keymgr-audit"
        assert rec["KEYMGR_SEQ"] == str(ev["seq"]) and rec["KEYMGR_EVENT"] == ev["event"]
        assert rec["KEYMGR_HASH"] == ev["hash"] and rec["KEYMGR_JSON"] == raw.decode()
        assert rec["MESSAGE"].startswith(ev["event"])
        assert rec["PRIORITY"] in ("4", "5", "6")
        assert line.startswith("<") and " keymgr-audit[" in line
        assert f"seq={ev['seq']} event={ev['event']}" in line
    revoked = [r for r in records if r["KEYMGR_EVENT"] == "key.revoked"]
    assert revoked and revoked[0]["KEYMGR_REASON"] == "two\nlines"  # binary field form
    assert revoked[0]["PRIORITY"] == "5"
    assert any('reason="two\\nlines"' in x for x in lines)
    assert fo.stop() == 0


@pytest.mark.parametrize("action", ["show", "follow"])
def test_help_has_formats_and_examples(action: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "keymgr.cli", "audit", action, "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert f"keymgr audit {action}" in text.split("example", 1)[1]
    if action == "show":
        assert "RFC 3339" in text and "7d" in text and "does not verify" in text
        assert "RFC 7638 thumbprint" in text
    else:
        assert "--from-start" in text and "--syslog-socket" in text and "tail -F" in text
        assert "--interval" not in text
