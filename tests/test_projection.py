"""``keymgr.projection``: the whole path to a time T, and ``keymgr plan --at``.

The projection is checked against what really happens: each scenario projects
from a state, then lets the real ``Reconciler`` (``Sim`` of
tests/test_planner_rules.py, over the in-memory plug-ins) run through the same
period the way the daemon does (a pass at every moment its plan names), and
the two sequences of key transitions must be identical, time, order and key
included (placeholder kids stand for the keys generated later, in order).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgr.errors import UsageError
from keymgr.model import ACTIVE, EXPIRED, PUBLISHED, RETIRED, Key, State
from keymgr.planner import Policy, Upcoming, plan
from keymgr.projection import (
    ACTIONS,
    ASSUMPTION,
    MAX_HORIZON,
    ProjectionLimit,
    Step,
    is_placeholder,
    migrating,
    migration_warning,
    migrations,
    placeholder_kid,
    project,
)
from tests import test_planner_rules as rules
from tests.conftest import SHORT_POLICY, Home
from tests.conftest import T0 as CLI_T0
from tests.conftest import A as CLI_A
from tests.conftest import D as CLI_D
from tests.conftest import G as CLI_G
from tests.conftest import P as CLI_P
from tests.test_planner_rules import (
    DAY,
    HOUR,
    MIN,
    SEC,
    T0,
    A,
    D,
    G,
    P,
    Sim,
    bootstrapped,
    build,
    key,
    policies,
    policy,
)


@pytest.fixture(autouse=True)
def _scratch(tmp_path: Path) -> Iterator[None]:
    """Where Sim keeps its audit logs (tests/test_planner_rules.py's fixture)."""
    rules._SCRATCH.append(tmp_path)
    yield
    rules._SCRATCH.remove(tmp_path)


Path_ = list[tuple[datetime, str, str]]
_PLACEHOLDER = re.compile(r"<next-(\d+) of (.+)>")


def active_name(sim: Sim, ring: str = "api") -> str:
    active = sim.ring(ring).active
    assert active is not None
    return sim.name(active.kid)


def set_alg(sim: Sim, ring: str, alg: str) -> None:
    """Change a ring's configured algorithm, as an edited config reloaded."""
    pols = dict(sim.policies)
    pols[ring] = replace(pols[ring], algorithm=alg)
    sim.policies = pols
    sim.reconciler.config = replace(sim.reconciler.config, policies=pols)


def projected_vs_real(sim: Sim, until: datetime) -> tuple[Path_, Path_, tuple[Step, ...]]:
    """Project from the sim's state and clock to ``until``, then run the real
    reconciler there the way the daemon does; both paths as (time, event, key
    name), placeholders replaced by the names of the keys really generated."""
    start = sim.now
    observed = sim.reconciler.observe(sim.state)  # what a pass (and `plan`) starts from
    before = observed
    proj = project(observed, sim.policies, start, until, sim.reconciler.config.publishers)
    assert observed == before  # states are immutable: nothing projected leaks back
    made, logged = len(sim.mem.created), len(sim.log)
    sim.wake_until(until)
    new: dict[str, list[str]] = {}
    for ring, kid in sim.mem.created[made:]:
        new.setdefault(ring, []).append(sim.name(kid))

    def name(kid: str) -> str:
        m = _PLACEHOLDER.fullmatch(kid)
        if m is None:
            return sim.name(kid)
        n, ring = int(m.group(1)), m.group(2)
        got = new.get(ring, [])
        return got[n - 1] if n <= len(got) else kid  # never generated: left as is

    projected = [(s.at, s.event, name(s.kid)) for s in proj.steps]
    real: Path_ = []
    for t, entry in sim.log[logged:]:
        event, who = entry.split(" ")
        real.append((t, event, who))
    return projected, real, proj.steps


def assert_same_path(sim: Sim, until: datetime, min_steps: int = 1) -> tuple[Step, ...]:
    projected, real, steps = projected_vs_real(sim, until)
    assert projected == real, "\n".join(
        ["projected:", *map(str, projected), "real:", *map(str, real)]
    )
    assert len(projected) >= min_steps, projected
    return steps


# --- the projection matches the real reconciler ------------------------------------


def _fresh() -> tuple[Sim, datetime]:
    return Sim(), T0 + 100 * DAY


def _two_rings() -> tuple[Sim, datetime]:
    web = policy(
        "web", period=7 * DAY, ahead=2 * HOUR, grace=12 * HOUR,
        destroy_after=timedelta(0), publishers=("site", "www"),
    )
    return Sim(policy(), web), T0 + 75 * DAY


def _rotate_requested() -> tuple[Sim, datetime]:
    sim = bootstrapped()
    sim.now = T0 + 5 * DAY
    sim.rotate()
    return sim, sim.now + 70 * DAY


def _emergency_requested() -> tuple[Sim, datetime]:
    sim = bootstrapped()
    sim.now = T0 + 3 * DAY + 17 * MIN
    sim.rotate(emergency=True)
    return sim, sim.now + 40 * DAY


def _signer_revoked() -> tuple[Sim, datetime]:
    sim = bootstrapped()
    sim.wake_until(T0 + P + HOUR)
    sim.now = T0 + P + 2 * HOUR
    sim.revoke(active_name(sim))
    return sim, sim.now + 50 * DAY


def _retired_key_revoked() -> tuple[Sim, datetime]:
    sim = bootstrapped()
    sim.wake_until(T0 + P + HOUR)
    sim.now = T0 + P + 2 * HOUR
    sim.revoke("api-1")
    return sim, sim.now + 50 * DAY


def _mid_rotation() -> tuple[Sim, datetime]:
    sim = bootstrapped()
    sim.wake_until(T0 + P - A + 10 * MIN)  # successor published, not yet promoted
    return sim, T0 + 3 * P


def _publisher_reverted() -> tuple[Sim, datetime]:
    """A target put back the document without the successor: it is written
    again and the promotion waits A from the repaired confirmation."""
    sim = bootstrapped()
    sim.wake_until(T0 + P - A + 20 * MIN)
    sim.publishers["cdn"].revert()
    sim.now = T0 + P - A + 40 * MIN
    return sim, T0 + 2 * P


def _expired_still_listed() -> tuple[Sim, datetime]:
    t = T0 + P + G
    state = build(
        key("k1", EXPIRED, T0, published_at=T0, activated_at=T0, retired_at=T0 + P, expired_at=t),
        key("k2", ACTIVE, T0 + P - A, published_at=T0 + P - A, activated_at=T0 + P),
        listed={"site": ["k2"], "cdn": ["k1", "k2"]},
    )
    return Sim(state=state, now=t), t + 2 * P


def _alg_changed() -> tuple[Sim, datetime]:
    sim = bootstrapped()
    sim.wake_until(T0 + 10 * DAY)
    set_alg(sim, "api", "ES256")
    return sim, T0 + 4 * P


SCENARIOS: dict[str, Callable[[], tuple[Sim, datetime]]] = {
    "fresh": _fresh,
    "two-rings": _two_rings,
    "rotate": _rotate_requested,
    "emergency": _emergency_requested,
    "signer-revoked": _signer_revoked,
    "retired-revoked": _retired_key_revoked,
    "mid-rotation": _mid_rotation,
    "publisher-reverted": _publisher_reverted,
    "expired-still-listed": _expired_still_listed,
    "algorithm-changed": _alg_changed,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_projection_is_what_the_reconciler_does(scenario: str) -> None:
    sim, until = SCENARIOS[scenario]()
    assert_same_path(sim, until, min_steps=4)


def test_the_reverted_publisher_delays_the_projected_promotion() -> None:
    sim, until = _publisher_reverted()
    steps = assert_same_path(sim, until)
    promoted = [s for s in steps if s.action == "promote"]
    # Not T0 + P: A after the document was confirmed again (at sim.now).
    assert promoted[0].at == T0 + P - A + 40 * MIN + A


def test_projection_of_a_fresh_ring_is_the_documented_timeline() -> None:
    proj = project(State(), policies(), T0, T0 + P + G + D)
    first, second = placeholder_kid("api", 1), placeholder_kid("api", 2)
    assert [(s.at, s.action, s.kid, s.reason) for s in proj.steps] == [
        (T0, "generate", first, "bootstrap"),
        (T0, "publish", first, None),
        (T0, "promote", first, "bootstrap"),
        (T0 + P - A, "generate", second, "scheduled"),
        (T0 + P - A, "publish", second, None),
        (T0 + P, "promote", second, "scheduled"),
        (T0 + P, "retire", first, f"superseded by {second}"),
        (T0 + P + G, "expire", first, None),
        (T0 + P + G + D, "destroy", first, None),
    ]
    assert all(s.placeholder and s.alg == "EdDSA" for s in proj.steps)
    # What follows T: the third key, generated A before the second's period ends.
    assert proj.upcoming == {"api": Upcoming("generate", None, T0 + 2 * P - A)}


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    period_h=st.integers(2, 24 * 20),
    ahead_pct=st.integers(1, 100),
    grace_h=st.integers(1, 24 * 5),
    destroy_h=st.integers(0, 24 * 5),
    settle_h=st.integers(0, 24 * 30),
    act=st.sampled_from(["none", "rotate", "emergency", "revoke-signer", "alg"]),
    periods=st.integers(1, 4),
)
def test_projection_matches_the_reconciler_for_any_policy(
    period_h: int,
    ahead_pct: int,
    grace_h: int,
    destroy_h: int,
    settle_h: int,
    act: str,
    periods: int,
) -> None:
    period = period_h * HOUR
    ahead = max(MIN, (period * ahead_pct / 100) // MIN * MIN)
    pol = policy(
        period=period, ahead=ahead, grace=grace_h * HOUR, destroy_after=destroy_h * HOUR
    )
    sim = bootstrapped(pol)
    sim.wake_until(T0 + settle_h * HOUR)
    sim.now = T0 + settle_h * HOUR + 7 * SEC
    if act == "rotate":
        sim.rotate()
    elif act == "emergency":
        sim.rotate(emergency=True)
    elif act == "revoke-signer":
        sim.revoke(active_name(sim))
    elif act == "alg":
        set_alg(sim, "api", "ES256")
    assert_same_path(sim, sim.now + periods * period + pol.retire_grace + pol.destroy_after)


# --- algorithm changes ---------------------------------------------------------------


def test_projection_follows_algorithm_changes_like_the_reconciler() -> None:
    """EdDSA -> ES256, then ES256 -> RS256 while the first ES256 key waits to be
    promoted: that one still signs its period, the RS256 key comes after it."""
    sim = bootstrapped()
    sim.wake_until(T0 + DAY)
    set_alg(sim, "api", "ES256")
    steps = assert_same_path(sim, T0 + P - A + 5 * MIN)
    assert [(s.action, s.alg) for s in steps] == [("generate", "ES256"), ("publish", "ES256")]
    set_alg(sim, "api", "RS256")
    steps = assert_same_path(sim, T0 + 3 * P)
    algs = {s.kid: s.alg for s in steps}
    promoted = [algs[s.kid] for s in steps if s.action == "promote"]
    assert promoted[:2] == ["ES256", "RS256"], promoted
    assert sim.key("api-2").alg == "ES256" and sim.key("api-3").alg == "RS256"


def _migrating_state(pending_old: bool = False) -> tuple[State, dict[str, Policy]]:
    pols = policies(replace(policy(), algorithm="ES256"))
    keys: list[Key] = [key("k1", ACTIVE, T0, published_at=T0, activated_at=T0)]
    if pending_old:  # an EdDSA successor published before the config changed
        keys.append(key("k2", PUBLISHED, T0 + P - A, published_at=T0 + P - A))
    return build(*keys, pols=pols), pols


def test_migration_times_come_from_the_projection() -> None:
    state, pols = _migrating_state()
    assert migrating(state, pols) == ["api"]
    [m] = migrations(state, pols, T0 + DAY)
    assert (m.ring, m.old, m.new) == ("api", ("EdDSA",), "ES256")
    assert m.published_at == T0 + P - A
    assert m.active_at == T0 + P
    assert m.old_unpublished_at == T0 + P + G
    proj = project(state, pols, T0 + DAY, T0 + P + G)
    first_new = next(s for s in proj.steps if s.alg == "ES256" and s.action == "promote")
    assert first_new.at == m.active_at


def test_an_old_algorithm_successor_already_published_delays_the_switch_a_period() -> None:
    state, pols = _migrating_state(pending_old=True)
    [m] = migrations(state, pols, T0 + P - A + MIN)
    assert m.published_at == T0 + 2 * P - A
    assert m.active_at == T0 + 2 * P
    assert m.old_unpublished_at == T0 + 2 * P + G


def test_a_switched_ring_reports_until_the_old_keys_leave_the_jwks() -> None:
    pols = policies(replace(policy(), algorithm="ES256"))
    new = replace(
        key("k2", ACTIVE, T0 + P - A, published_at=T0 + P - A, activated_at=T0 + P),
        alg="ES256",
    )
    old = key("k1", RETIRED, T0, published_at=T0, activated_at=T0, retired_at=T0 + P)
    state = build(old, new, pols=pols)
    [m] = migrations(state, pols, T0 + P + HOUR)
    assert (m.published_at, m.active_at, m.old_unpublished_at) == (
        T0 + P - A, T0 + P, T0 + P + G,
    )
    text = migration_warning(m, T0 + P + HOUR)
    assert "was published at" in text and "signs since" in text
    assert "leaves the JWKS at" in text
    # Once the old key is out of the JWKS, nothing is left to warn about.
    gone = build(replace(old, state=EXPIRED, expired_at=T0 + P + G), new, pols=pols)
    assert migrating(gone, pols) == [] and migrations(gone, pols, T0 + P + G) == []


def test_migration_warning_names_both_algorithms_and_every_time() -> None:
    state, pols = _migrating_state()
    [m] = migrations(state, pols, T0 + DAY)
    text = migration_warning(m, T0 + DAY)
    assert "\n" not in text
    for part in (
        "keyrings.api.algorithm: changing from EdDSA to ES256",
        "is published at 2030-01-30T23:00:00Z",
        "starts signing at 2030-01-31T00:00:00Z",
        "leaves the JWKS at 2030-02-01T00:00:00Z",
        "must accept ES256 from the moment its key is published",
    ):
        assert part in text, (part, text)


def test_no_migration_without_an_algorithm_change() -> None:
    state = build(key("k1", ACTIVE, T0, published_at=T0, activated_at=T0))
    assert migrating(state, policies()) == [] and migrations(state, policies(), T0) == []
    assert migrating(State(), policies()) == []


# --- purity, placeholders, limits -----------------------------------------------------


def test_projection_is_deterministic_and_leaves_its_input_alone() -> None:
    state, pols = _migrating_state(pending_old=True)
    before = state.to_dict()
    one = project(state, pols, T0 + DAY, T0 + 5 * P)
    two = project(state, pols, T0 + DAY, T0 + 5 * P)
    assert one == two
    assert state.to_dict() == before
    assert {s.kid for s in one.steps if not s.placeholder} == {"k1", "k2"}
    assert [s.kid for s in one.steps if s.action == "generate"] == [
        placeholder_kid("api", n) for n in range(1, 5)
    ]
    # The real planner on the real state still sees only real keys.
    assert plan(state, pols, T0 + DAY).due == ()


def test_placeholders_are_never_taken_for_real_keys() -> None:
    assert is_placeholder(placeholder_kid("api", 3))
    assert not is_placeholder("-53xYArZSSxAWgxSwQ5H43DgBcpINhRWaPWNTBjyUhY")
    bogus = build(key(placeholder_kid("api", 1), ACTIVE, T0, published_at=T0, activated_at=T0))
    with pytest.raises(ValueError, match="projected key"):
        project(bogus, policies(), T0, T0 + DAY)


def test_projection_to_now_is_the_wave_due_now() -> None:
    proj = project(State(), policies(), T0, T0)
    assert [s.action for s in proj.steps] == ["generate", "publish", "promote"]
    settled = build(key("k1", ACTIVE, T0, published_at=T0, activated_at=T0))
    assert project(settled, policies(), T0 + DAY, T0 + DAY).steps == ()


def test_projection_refuses_a_far_or_crowded_horizon() -> None:
    with pytest.raises(ProjectionLimit, match="more than 3650d after") as e:
        project(State(), policies(), T0, T0 + MAX_HORIZON + SEC)
    assert isinstance(e.value, UsageError) and "\n" not in str(e.value)
    project(State(), policies(), T0, T0 + 3 * P)  # well within
    with pytest.raises(ProjectionLimit, match="more than 5 transitions"):
        project(State(), policies(), T0, T0 + 3 * P, max_steps=5)
    with pytest.raises(ValueError):
        project(State(), policies(), T0, T0 - SEC)


def test_edges_confirm_optimistically() -> None:
    """With probed edges (verify_urls), the optimistic path has each edge show a
    confirmed document at once: the promotion is not pushed back by the walk."""
    edges = {"site": ("https://edge.example/jwks.json",)}
    state = build(
        key("k1", ACTIVE, T0, published_at=T0, activated_at=T0),
        key("k2", PUBLISHED, T0 + P - A, published_at=T0 + P - A),
    )
    proj = project(state, policies(), T0 + P - A, T0 + P, edges=edges)
    assert [(s.at, s.action, s.kid) for s in proj.steps] == [
        (T0 + P, "promote", "k2"),
        (T0 + P, "retire", "k1"),
    ]


def test_the_assumption_is_stated() -> None:
    assert ASSUMPTION.startswith("optimistic path:")
    assert "confirms each JWKS write the moment it is due" in ASSUMPTION


# --- the CLI: keymgr plan --at -----------------------------------------------------


def ts(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _drill_home(home: Home) -> str:
    home.set_ring(**SHORT_POLICY)
    home.run("reconcile", "--at", ts(CLI_T0), check=True)
    return home.kid_in("active")


def test_plan_at_json_is_the_whole_path_and_reconcile_follows_it(home: Home) -> None:
    k1 = _drill_home(home)
    until = CLI_T0 + 25 * DAY
    before = home.files()
    doc = json.loads(home.run("plan", "--at", ts(until), "--json", check=True).stdout)
    assert home.files() == before  # nothing written: state, keys, JWKS, audit log
    assert doc["from"] == ts(CLI_T0) and doc["at"] == ts(until)
    assert doc["assumes"] == ASSUMPTION and doc["migrations"] == []
    n1, n2 = placeholder_kid("default", 1), placeholder_kid("default", 2)
    P_, A_, G_, D_ = CLI_P, CLI_A, CLI_G, CLI_D
    expected = [
        (P_ - A_, "generate", n1), (P_ - A_, "publish", n1),
        (P_, "promote", n1), (P_, "retire", k1),
        (P_ + G_, "expire", k1), (P_ + G_ + D_, "destroy", k1),
        (2 * P_ - A_, "generate", n2), (2 * P_ - A_, "publish", n2),
        (2 * P_, "promote", n2), (2 * P_, "retire", n1),
        (2 * P_ + G_, "expire", n1), (2 * P_ + G_ + D_, "destroy", n1),
    ]  # fmt: skip
    assert [(s["at"], s["action"], s["kid"]) for s in doc["path"]] == [
        (ts(CLI_T0 + dt), action, kid) for dt, action, kid in expected
    ]
    assert all(s["alg"] == "ES256" for s in doc["path"])
    assert [s["placeholder"] for s in doc["path"]] == [k != k1 for _, _, k in expected]
    assert doc["upcoming"] == {
        "default": {"action": "generate", "kid": None, "at": ts(CLI_T0 + 3 * P_ - A_)}
    }

    # Drive the real CLI through the same times: the audit log records the same path.
    for at in sorted({s["at"] for s in doc["path"]}):
        home.run("reconcile", "--at", at, check=True, inproc=True)
    events = [
        json.loads(line)
        for line in home.run("audit", "show", "--json", check=True).stdout.splitlines()
    ]
    real = [
        (e["ts"], e["event"], e["kid"])
        for e in events
        if e["event"] in ("key.generated", "key.published", "key.promoted", "key.retired",
                          "key.expired", "key.destroyed")
        and e["ts"] > ts(CLI_T0)
    ]
    generated = [kid for _, ev, kid in real if ev == "key.generated"]
    names = {n1: generated[0], n2: generated[1]}
    event = {action: ev for ev, action in ACTIONS.items()}
    assert real == [
        (s["at"], event[s["action"]], names.get(s["kid"], s["kid"])) for s in doc["path"]
    ]


def test_plan_at_table(home: Home) -> None:
    k1 = _drill_home(home)
    until = CLI_T0 + CLI_P + CLI_G
    proc = home.run("plan", "--at", ts(until), check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == f"path from {ts(CLI_T0)} to {ts(until)}: 5 transition(s)"
    assert lines[1] == f"assumes the {ASSUMPTION}"
    heads = ["TIME", "RING", "ACTION", "KID", "ALG", "REASON"]
    assert lines[2].split() == heads
    cols = [lines[2].index(h) for h in heads] + [None]

    def cells(line: str) -> list[str]:
        return [line[a:b].strip() for a, b in itertools.pairwise(cols)]

    n1 = placeholder_kid("default", 1)
    t_gen, t_pro, t_exp = (ts(CLI_T0 + dt) for dt in (CLI_P - CLI_A, CLI_P, CLI_P + CLI_G))
    assert [cells(line) for line in lines[3:8]] == [
        [t_gen, "default", "generate", n1, "ES256", "scheduled"],
        [t_gen, "default", "publish", n1, "ES256", ""],
        [t_pro, "default", "promote", n1, "ES256", "scheduled"],
        [t_pro, "default", "retire", k1, "ES256", f"superseded by {n1}"],
        [t_exp, "default", "expire", k1, "ES256", ""],
    ]
    assert lines[8:] == [
        f"after {ts(until)}:",
        f"  default: destroy {k1} at {ts(CLI_T0 + CLI_P + CLI_G + CLI_D)}",
    ]
    assert proc.stderr == ""  # no algorithm change: no warning


def test_plan_without_at_is_unchanged(home: Home) -> None:
    _drill_home(home)
    doc = json.loads(home.run("plan", "--json", check=True).stdout)
    assert set(doc) == {"at", "due", "upcoming"}
    assert doc["due"] == []
    assert doc["upcoming"]["default"]["action"] == "generate"
    text = home.run("plan", check=True).stdout
    assert text.startswith(f"plan at {doc['at']}\ndue now: nothing\nupcoming:\n")


def test_plan_at_refuses_absurd_times_in_one_line(home: Home) -> None:
    _drill_home(home)
    far = home.run("plan", "--at", "2099-01-01T00:00:00Z")
    assert far.returncode == 2 and far.stdout == ""
    assert far.stderr.count("\n") == 1 and "more than 3650d after" in far.stderr
    past = home.run("plan", "--at", ts(CLI_T0 - SEC))
    assert past.returncode == 2 and "earlier than the newest time in state" in past.stderr
    # A path of too many transitions (hourly rotations for years) is refused too.
    home.set_ring(rotation_period="1h", publish_ahead="1m", retire_grace="1m",
                  destroy_after="0s")  # fmt: skip
    # Forgotten at once: thousands of destroyed records would only make the
    # path slower to walk up to the limit, not change the refusal.
    home.config.write_text(home.config.read_text().replace(
        "[keyrings.default]", '[keyrings.default]\nhistory = "0s"', 1))
    crowded = home.run("plan", "--at", ts(CLI_T0 + 3000 * DAY), inproc=True)
    assert crowded.returncode == 2 and crowded.stdout == ""
    assert crowded.stderr.count("\n") == 1 and "project to an earlier time" in crowded.stderr
