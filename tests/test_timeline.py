"""keymgr.timeline: the SVG picture, its terminal form, and ``status --timeline``.

The SVG is parsed with xml.etree and checked for its structure: one bar per
key, each segment in its state's colour, past segments before the "now"
marker and projected ones after it, the publish-ahead and grace windows at
the times the timing rules give, and the next transition where the planner
puts it. The states are built by the real planner and transitions, or by the
CLI with ``--at``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from keymgr import timeline
from keymgr.manager import KeyManager
from keymgr.model import Key, PublisherRecord, Ring, State
from keymgr.planner import Policy, plan
from keymgr.timefmt import format_time
from tests.conftest import SHORT_POLICY, T0, Home

NS = {"svg": "http://www.w3.org/2000/svg"}
P, A, G, D = timedelta(days=10), timedelta(hours=12), timedelta(days=2), timedelta(days=1)


def policy(ring: str = "api", **kw: timedelta) -> Policy:
    d = {"rotation_period": P, "publish_ahead": A, "retire_grace": G, "destroy_after": D}
    d.update(kw)
    return Policy(ring=ring, backend="local", algorithm="ES256", publishers=("site",), **d)


def key(kid: str, state: str, **times: datetime) -> Key:
    return Key(kid=kid, alg="ES256", backend="local", state=state, public_jwk={}, **times)


def kid(c: str) -> str:
    return c * 43


def mid_rotation() -> tuple[State, dict[str, Policy], datetime]:
    """Ring api: a retired key in its grace, the signer, and its successor
    published and waiting A; ring web: one signer, nothing due for days."""
    k1 = key(kid("a"), "retired", created_at=T0 - P, published_at=T0 - P,
             activated_at=T0 - P, retired_at=T0)
    k2 = key(kid("b"), "active", created_at=T0 - A, published_at=T0 - A, activated_at=T0)
    k3 = key(kid("c"), "published", created_at=T0 + P - A, published_at=T0 + P - A)
    w1 = key(kid("w"), "active", created_at=T0, published_at=T0, activated_at=T0)
    # Still in grace at now? now = T0 + P - A + 3h: k1 retired at T0, G = 2d: expired.
    now = T0 + P - A + timedelta(hours=3)
    k1 = replace(k1, state="expired", expired_at=T0 + G)
    k0 = key(kid("z"), "destroyed", created_at=T0 - 2 * P, published_at=T0 - 2 * P,
             activated_at=T0 - 2 * P, retired_at=T0 - P, expired_at=T0 - P + G,
             destroyed_at=T0 - P + G + D)
    # The publisher has served the successor since its publication.
    site = PublisherRecord(
        sha256="0" * 64, kids=frozenset({k2.kid, k3.kid, w1.kid}), confirmed_at=k3.created_at,
        since={k2.kid: T0 - A, k3.kid: k3.created_at, w1.kid: T0},
    )
    state = State(rings={"api": Ring("api", (k0, k1, k2, k3)), "web": Ring("web", (w1,))},
                  publishers={"site": site})
    return state, {"api": policy("api"), "web": policy("web")}, now


def in_grace() -> tuple[State, dict[str, Policy], datetime]:
    """Ring api just after a promotion: the old key retired, in its grace."""
    k1 = key(kid("a"), "retired", created_at=T0 - P, published_at=T0 - P,
             activated_at=T0 - P, retired_at=T0)
    k2 = key(kid("b"), "active", created_at=T0 - A, published_at=T0 - A, activated_at=T0)
    return State(rings={"api": Ring("api", (k1, k2))}), {"api": policy("api")}, T0 + G / 2


def parse(text: str) -> ET.Element:
    return ET.fromstring(text)


def groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{{{NS['svg']}}}g") if cls in (g.get("class") or "").split()]


def ts(t: datetime) -> str:
    s = format_time(t)
    assert s is not None
    return s


# --------------------------------------------------------------------------- SVG


def test_svg_is_self_contained_accessible_and_deterministic() -> None:
    state, pols, now = mid_rotation()
    p = plan(state, pols, now)
    text = timeline.svg(state, pols, p, now)
    assert text == timeline.svg(state, pols, p, now), "same inputs, same bytes"
    root = parse(text)
    assert root.tag == f"{{{NS['svg']}}}svg"
    assert root.get("role") == "img"
    title = root.find("svg:title", NS)
    desc = root.find("svg:desc", NS)
    assert title is not None and desc is not None
    assert set((root.get("aria-labelledby") or "").split()) == {title.get("id"), desc.get("id")}
    assert "Ring api" in (desc.text or "") and "Ring web" in (desc.text or "")
    # No script, no CSS, nothing fetched: presentation attributes only.
    for el in root.iter():
        tag = el.tag.split("}")[1]
        assert tag not in ("script", "style", "image", "use", "foreignObject", "a"), tag
        for name, value in el.attrib.items():
            assert name not in ("style", "href", "{http://www.w3.org/1999/xlink}href"), name
            assert not name.startswith("on"), name
            assert "url(" not in value and "http" not in value, (name, value)
    assert "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_svg_bars_per_key_in_state_colours_around_now() -> None:
    state, pols, now = mid_rotation()
    root = parse(timeline.svg(state, pols, plan(state, pols, now), now))
    rings = {g.get("data-ring"): g for g in groups(root, "ring")}
    assert list(rings) == ["api", "web"]

    now_g = groups(root, "now")
    assert len(now_g) == 1 and now_g[0].get("data-at") == ts(now)
    line = now_g[0].find("svg:line", NS)
    assert line is not None
    now_x = float(line.get("x1") or 0)

    api_keys = groups(rings["api"], "key")
    # The destroyed key is not drawn (and the note says so).
    assert [(g.get("data-kid"), g.get("data-state")) for g in api_keys] == [
        (kid("a"), "expired"), (kid("b"), "active"), (kid("c"), "published")
    ]
    assert "destroyed" in "".join(root.itertext())
    for g in api_keys:
        segs = g.findall("svg:rect", NS)
        assert segs, g.get("data-kid")
        for s in segs:
            assert s.get("fill") == timeline.COLOURS[s.get("data-state") or ""]
            x0 = float(s.get("x") or 0)
            x1 = x0 + float(s.get("width") or 0)
            if s.get("data-projected") == "true":
                assert x0 >= now_x - 0.1 and s.get("fill-opacity") == "0.45"
            else:
                assert x1 <= now_x + 1.1  # at least 1 px wide
            assert (s.find("svg:title", NS).text or "").startswith(g.get("data-kid") or "-")
        past = [s for s in segs if s.get("data-projected") == "false"]
        # The segment that reaches now is the key's present state.
        assert past[-1].get("data-state") == g.get("data-state")
        assert past[-1].get("data-end") == ts(now)
    signer = {(s.get("data-state"), s.get("data-projected")): s
              for s in api_keys[1].findall("svg:rect", NS)}
    # The signer: active since T0, then (projected) retired at the successor's promotion.
    promote_at = T0 + P
    assert signer[("active", "false")].get("data-start") == ts(T0)
    assert signer[("active", "true")].get("data-end") == ts(promote_at)
    assert signer[("retired", "true")].get("data-start") == ts(promote_at)
    assert signer[("retired", "true")].get("data-end") == ts(promote_at + G)
    succ = [s for s in api_keys[2].findall("svg:rect", NS)]
    assert [(s.get("data-state"), s.get("data-projected")) for s in succ][:3] == [
        ("published", "false"), ("published", "true"), ("active", "true")
    ]
    assert succ[2].get("data-start") == ts(promote_at)
    # Text labels, not colour alone.
    texts = [t.text or "" for t in rings["api"].iter(f"{{{NS['svg']}}}text")]
    assert any(t.endswith("active") and t.startswith(kid("b")[:8]) for t in texts)


def test_svg_windows_and_next_transition() -> None:
    state, pols, now = mid_rotation()
    p = plan(state, pols, now)
    up = p.upcoming["api"]
    assert up is not None and up.action == "promote" and up.kid == kid("c")
    root = parse(timeline.svg(state, pols, p, now))
    api = next(g for g in groups(root, "ring") if g.get("data-ring") == "api")
    ahead = groups(api, "window-publish-ahead")
    assert len(ahead) == 1
    assert ahead[0].get("data-kid") == kid("c")
    assert ahead[0].get("data-start") == ts(T0 + P - A)  # published
    assert ahead[0].get("data-end") == ts(up.at)  # A after, and not before P
    grace = groups(api, "window-grace")
    # The signer's grace to come, after its successor's promotion.
    assert [(g.get("data-kid"), g.get("data-start"), g.get("data-end")) for g in grace] == [
        (kid("b"), ts(up.at), ts(up.at + G))
    ]
    assert "A 12h" in "".join(ahead[0].itertext()) and "G 2d" in "".join(grace[0].itertext())
    nexts = groups(api, "next")
    assert [(n.get("data-action"), n.get("data-kid"), n.get("data-at")) for n in nexts] == [
        ("destroy", kid("a"), ts(now)),  # overdue: D has passed since it expired
        ("promote", kid("c"), ts(up.at)),
    ]
    assert nexts[0].get("data-due") == "true"

    # A retired key in its grace: its window from retirement to retirement + G.
    state, pols, now = in_grace()
    root = parse(timeline.svg(state, pols, plan(state, pols, now), now))
    grace = [g for g in groups(root, "window-grace") if g.get("data-kid") == kid("a")]
    assert [(g.get("data-start"), g.get("data-end")) for g in grace] == [(ts(T0), ts(T0 + G))]
    segs = {(s.get("data-state"), s.get("data-projected")): s
            for s in groups(root, "key")[0].findall("svg:rect", NS)}
    assert segs[("retired", "true")].get("data-end") == ts(T0 + G)
    assert segs[("expired", "true")].get("data-end") == ts(T0 + G + D)
    # The next publish-ahead window: the successor generated at P - A, promoted at P.
    ahead = groups(root, "window-publish-ahead")
    assert [(g.get("data-start"), g.get("data-end"), g.get("data-kid")) for g in ahead] == [
        (ts(T0 + P - A), ts(T0 + P), None)
    ]


def test_svg_is_bounded_for_many_rings() -> None:
    rings = {f"r{i:03d}": Ring(f"r{i:03d}", (key(kid("k"), "active", created_at=T0,
                                                   published_at=T0, activated_at=T0),))
             for i in range(300)}
    pols = {n: policy(n) for n in rings}
    state = State(rings=rings)
    now = T0 + timedelta(days=1)
    text = timeline.svg(state, pols, plan(state, pols, now), now)
    root = parse(text)
    drawn = [g.get("data-ring") for g in groups(root, "ring")]
    assert drawn == [f"r{i:03d}" for i in range(timeline.MAX_RINGS)]
    assert "280 more ring(s) not shown" in text
    assert len(text) < 200_000
    only = parse(timeline.svg(state, pols, None, now, rings=["r150", "r007"]))
    assert [g.get("data-ring") for g in groups(only, "ring")] == ["r007", "r150"]
    # No plan: bars and windows, no next marker.
    assert not groups(only, "next")


def test_svg_empty_and_unconfigured_rings() -> None:
    empty = parse(timeline.svg(State(), {"api": policy()}, None, T0))
    assert [g.get("data-ring") for g in groups(empty, "ring")] == ["api"]
    assert "(no keys yet)" in "".join(empty.itertext())
    # A ring in state that the config dropped: drawn, nothing projected.
    state, _, now = in_grace()
    root = parse(timeline.svg(state, {}, None, now))
    segs = [s for g in groups(root, "key") for s in g.findall("svg:rect", NS)]
    assert segs and all(s.get("data-projected") == "false" for s in segs)
    assert not groups(root, "window")


# --------------------------------------------------------------------------- terminal


def test_terminal_timeline() -> None:
    state, pols, now = mid_rotation()
    p = plan(state, pols, now)
    for width in (40, 80, 132):
        out = timeline.text(state, pols, p, now, width=width)
        lines = out.splitlines()
        assert all(len(line) <= width for line in lines), out
        assert out == timeline.text(state, pols, p, now, width=width)
    out = timeline.text(state, pols, p, now, width=200)
    lines = out.splitlines()
    now_col = next(ln for ln in lines if "▼ now" in ln).index("▼")
    rows = {ln.split()[0]: ln for ln in lines if ln.startswith("  ") and ln.split()[0] != "windows"}
    signer, succ, old = rows[kid("b")[:8]], rows[kid("c")[:8]], rows[kid("a")[:8]]
    assert signer[now_col] == "│" and succ[now_col] == "│" and old[now_col] == "│"
    assert "█" in signer[:now_col] and "▓" in signer[now_col:]  # active, then retired
    assert "▒" in succ[:now_col] and "█" in succ[now_col:]  # published, then active
    assert set(old[15:now_col]) <= {"─", " ", "▓", "█", "▒"} and "─" in old
    windows = [ln for ln in lines if ln.strip().startswith("windows")]
    assert len(windows) == 2
    assert "A" in windows[0] and "G" in windows[0] and "◆" in windows[0]
    assert "ring api  next: destroy aaaaaaaa… due now; then promote cccccccc… in 9h" in out
    assert "ring web  next: generate due now" in out
    assert "1 key(s) not drawn" in out


def test_terminal_is_bounded_and_safe() -> None:
    rings = {f"r{i:03d}": Ring(f"r{i:03d}") for i in range(25)}
    rings["bad\x1b[2Jname"] = Ring("bad\x1b[2Jname")
    out = timeline.text(State(rings=rings), {}, None, T0, width=60)
    assert "\x1b" not in out
    assert out.count("ring ") == timeline.MAX_RINGS
    assert "6 more ring(s) not shown" in out


# --------------------------------------------------------------------------- CLI and API


def drive(home: Home) -> None:
    """Ring default mid-rotation, in simulated time: state.clock is then in the
    future, so status's 'now' is exactly the last --at (deterministic)."""
    home.set_ring(**SHORT_POLICY)
    home.run("reconcile", "--at", ts(T0), check=True, inproc=True)
    home.run("reconcile", "--at", ts(T0 + timedelta(days=10) - timedelta(hours=1)),
             check=True, inproc=True)


def test_cli_status_timeline_svg_and_api(home: Home, tmp_path: Path) -> None:
    drive(home)
    now = T0 + timedelta(days=10) - timedelta(hours=1)
    out = tmp_path / "out.svg"
    r = home.run("status", "--timeline", str(out))
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    text = out.read_text()
    root = parse(text)
    assert groups(root, "now")[0].get("data-at") == ts(now)
    keys = groups(root, "key")
    assert [k.get("data-state") for k in keys] == ["active", "published"]
    assert keys[1].get("data-kid") == home.kid_in("published")
    nxt = groups(root, "next")
    assert [(n.get("data-action"), n.get("data-at")) for n in nxt] == [
        ("promote", ts(T0 + timedelta(days=10)))
    ]
    # The same picture through the Python API.
    assert KeyManager.from_config(home.config).timeline_svg() == text
    # No path of the home in the picture.
    assert str(home.dir) not in text


def test_cli_status_timeline_terminal(home: Home) -> None:
    drive(home)
    r = home.run("status", "--timeline", "-", env=home.env(COLUMNS="64"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("key timeline at 2031-03-11T07:00:00Z")
    assert max(len(ln) for ln in lines) <= 64
    assert any(ln.startswith("ring default  next: promote") for ln in lines)
    assert any("▒" in ln for ln in lines) and any("█" in ln for ln in lines)
    env = home.env()
    env.pop("COLUMNS", None)
    wide = home.run("status", "--timeline", "-", env=env)
    assert max(len(ln) for ln in wide.stdout.splitlines()) <= 80
    m = KeyManager.from_config(home.config)
    assert m.timeline_text(width=64) == r.stdout.rstrip("\n")


def test_cli_status_timeline_unwritable(home: Home, tmp_path: Path) -> None:
    drive(home)
    r = home.run("status", "--timeline", str(tmp_path / "no" / "such" / "dir" / "t.svg"))
    assert r.returncode == 2
    assert r.stderr.startswith("keymgr: error: --timeline ") and r.stderr.count("\n") == 1
    assert r.stdout == ""


@pytest.mark.parametrize("columns", ["", "abc", "-5", "20"])
def test_cli_columns_fallbacks(home: Home, columns: str) -> None:
    drive(home)
    r = home.run("status", "--timeline", "-", env=home.env(COLUMNS=columns))
    assert r.returncode == 0, r.stderr
    widest = max(len(ln) for ln in r.stdout.splitlines())
    assert widest <= (40 if columns == "20" else 80)
    assert os.environ.get("KEYMGR_NEVER_SET") is None


# --------------------------------------------------------------------------- the docs' example

DOCS_SVG = Path(__file__).resolve().parent.parent / "docs" / "img" / "timeline.svg"


def docs_example() -> tuple[State, dict[str, Policy], datetime]:
    """The picture in docs/operator-views.md: three rings at three moments of
    their rotation (regenerate with KEYMGR_REGEN_DOCS=1)."""
    import base64
    import hashlib

    def k(name: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(name.encode()).digest()).decode()[:43]

    day, hour = timedelta(days=1), timedelta(hours=1)
    now = datetime(2031, 3, 20, 12, 0, tzinfo=T0.tzinfo)
    # api: the successor published, waiting publish_ahead before it signs.
    a_pol = policy("api", rotation_period=14 * day, publish_ahead=day, retire_grace=2 * day,
                   destroy_after=3 * day)
    a1 = key(k("api-1"), "active", created_at=now - 14 * day, published_at=now - 14 * day,
             activated_at=now - 13 * day - 6 * hour)
    a2 = key(k("api-2"), "published", created_at=now - 6 * hour, published_at=now - 6 * hour)
    # web: just rotated, the previous key kept published for its grace.
    w_pol = policy("web", rotation_period=7 * day, publish_ahead=6 * hour, retire_grace=day,
                   destroy_after=day)
    w1 = key(k("web-1"), "retired", created_at=now - 8 * day, published_at=now - 8 * day,
             activated_at=now - 7 * day - 8 * hour, retired_at=now - 8 * hour)
    w2 = key(k("web-2"), "active", created_at=now - 14 * hour, published_at=now - 14 * hour,
             activated_at=now - 8 * hour)
    # batch: an expired key (out of the JWKS) kept destroy_after before it is destroyed.
    b_pol = policy("batch", rotation_period=10 * day, publish_ahead=12 * hour,
                   retire_grace=12 * hour, destroy_after=3 * day)
    b1 = key(k("batch-1"), "expired", created_at=now - 12 * day, published_at=now - 12 * day,
             activated_at=now - 11 * day, retired_at=now - 2 * day, expired_at=now - 36 * hour)
    b2 = key(k("batch-2"), "active", created_at=now - 3 * day, published_at=now - 3 * day,
             activated_at=now - 2 * day)
    site = PublisherRecord(
        sha256="0" * 64, kids=frozenset({a1.kid, a2.kid, w1.kid, w2.kid, b2.kid}),
        confirmed_at=now - 6 * hour,
        since={a1.kid: now - 14 * day, a2.kid: now - 6 * hour, w1.kid: now - 8 * day,
               w2.kid: now - 14 * hour, b2.kid: now - 3 * day},
    )
    state = State(
        rings={"api": Ring("api", (a1, a2)), "web": Ring("web", (w1, w2)),
               "batch": Ring("batch", (b1, b2))},
        publishers={"site": site},
    )
    return state, {"api": a_pol, "web": w_pol, "batch": b_pol}, now


def test_docs_example_is_what_the_code_draws() -> None:
    state, pols, now = docs_example()
    text = timeline.svg(state, pols, plan(state, pols, now), now)
    term = timeline.text(state, pols, plan(state, pols, now), now, width=100)
    doc = DOCS_SVG.parent.parent / "operator-views.md"
    head, sep, rest = doc.read_text().partition(DOCS_TEXT_BLOCK)
    assert sep, f"{doc}: the terminal example's lead-in is gone"
    shown, end, tail = rest.partition("\n```\n")
    if os.environ.get("KEYMGR_REGEN_DOCS"):
        DOCS_SVG.parent.mkdir(exist_ok=True)
        DOCS_SVG.write_text(text)
        doc.write_text(head + sep + term + end + tail)
        shown = term
    assert DOCS_SVG.read_text() == text, "regenerate with KEYMGR_REGEN_DOCS=1"
    assert shown == term, "regenerate with KEYMGR_REGEN_DOCS=1"
    parse(text)


DOCS_TEXT_BLOCK = "The picture above, at 100 columns:\n\n```\n"
