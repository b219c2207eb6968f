"""Validation of a loaded state is proportional to what changed: rings handed
back as the same objects (a sharded store reuses what it did not re-read) are
not checked key by key again, while every new ring object is, and kids stay
unique across all rings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from keymgr import jose, validate
from keymgr.errors import StateError
from keymgr.model import ACTIVE, Key, Ring, State
from keymgr.testing.conformance import T0
from keymgr.testing.docstore import bump
from keymgr.validate import check_state


def sharded_state(n: int) -> State:
    """``n`` rings with one real, valid ES256 key each."""
    rings = {}
    for i in range(n):
        jwk = jose.public_jwk(jose.generate_private_key("ES256").public_key())
        key = Key(jose.thumbprint(jwk), "ES256", "local", ACTIVE, jwk, T0, T0, T0)
        rings[f"tenant-{i:03d}"] = Ring(f"tenant-{i:03d}", (key,))
    return State(rings=rings, clock=T0)


def test_only_new_ring_objects_are_checked_again(monkeypatch):
    state = sharded_state(50)
    calls: list[str] = []
    real = validate.key_problem
    monkeypatch.setattr(validate, "key_problem", lambda k: calls.append(k.kid) or real(k))
    checked: dict[int, Ring] = {}
    check_state(state, "s", checked)
    assert len(calls) == 50 and len(checked) == 50
    calls.clear()
    changed = bump(state, "tenant-007")
    check_state(changed, "s", checked)
    assert calls == [changed.rings["tenant-007"].keys[0].kid]


def test_a_bad_new_ring_is_refused_and_not_remembered():
    state = sharded_state(5)
    checked: dict[int, Ring] = {}
    check_state(state, "s", checked)
    ring = state.rings["tenant-002"]
    bad = state.with_ring(replace(ring, keys=(replace(ring.keys[0], kid=""),)))
    with pytest.raises(StateError, match="ring tenant-002"):
        check_state(bad, "s", checked)
    assert id(bad.rings["tenant-002"]) not in checked
    # A kid moved into another ring is a duplicate, even between checked rings.
    other = state.rings["tenant-003"]
    dup = state.with_ring(replace(other, keys=(*other.keys, ring.keys[0])))
    with pytest.raises(StateError, match="recorded twice"):
        check_state(dup, "s", checked)
