"""keymgr.config.parse_toml (rtoml, tomllib for what rtoml refuses) reads every
TOML the project ships or tests exactly as tomllib does.

rtoml is there for speed (a 100,000-ring config: 0.7 s instead of 5.4 s); the
meaning of a config must not depend on it. Checked on every tracked ``.toml``
file (configs, the bad configs of tests/bad_configs, deploy, examples) and on
every ``toml`` block of the docs, plus generated documents.
"""

from __future__ import annotations

import math
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keymgr.config import parse_toml

REPO = Path(__file__).resolve().parent.parent


def _tracked_toml() -> list[tuple[str, str]]:
    files = subprocess.run(
        ["git", "ls-files", "*.toml", "*.md"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.split()
    docs: list[tuple[str, str]] = []
    for name in files:
        try:
            text = (REPO / name).read_text("utf-8")
        except UnicodeDecodeError:
            continue  # tests/bad_configs/03-not-utf8.toml: refused before any parser
        if name.endswith(".toml"):
            docs.append((name, text))
        else:
            for i, block in enumerate(re.findall(r"```toml\n(.*?)```", text, re.S)):
                docs.append((f"{name}#{i}", block))
    return docs


DOCS = _tracked_toml()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _agree(text: str) -> None:
    try:
        want = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        with pytest.raises(tomllib.TOMLDecodeError) as got:
            parse_toml(text)
        assert str(got.value) == str(e)
        return
    assert _same(parse_toml(text), want)


def test_the_project_has_toml_to_check() -> None:
    assert len(DOCS) > 50, [n for n, _ in DOCS]
    assert any(n.startswith("tests/bad_configs/") for n, _ in DOCS)
    assert any(n.startswith("docs/") for n, _ in DOCS)


@pytest.mark.parametrize(("name", "text"), DOCS, ids=[n for n, _ in DOCS])
def test_every_project_toml_reads_as_tomllib_reads_it(name: str, text: str) -> None:
    _agree(text)


_KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,8}", fullmatch=True)
_VALUES = st.recursive(
    st.none().map(lambda _: "x")
    | st.text(max_size=12)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}"
                             for c in v) + '"'
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


@given(st.dictionaries(_KEYS, st.dictionaries(_KEYS, _VALUES, max_size=4), max_size=4))
@settings(max_examples=200, deadline=None)
def test_generated_documents_read_alike(tables: dict[str, dict[str, Any]]) -> None:
    text = "".join(
        f"[{t}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in body.items())
        for t, body in tables.items()
    )
    _agree(text)


@pytest.mark.parametrize(
    "text",
    [
        "a = 1\na = 2\n",  # duplicate key
        "[t]\n[t]\n",  # duplicate table
        "a = 99999999999999999999\n",  # beyond 64 bits
        "a = 1979-05-27T07:32:00Z\nb = 07:32:00\nc = 1979-05-27\n",
        'a = """\nline\n"""\nb = \'\'\'raw\\n\'\'\'\n',
        "a = [1, 'x', [2.5]]\n",
        "a = { b = 1, c = { d = 'e' } }\n",
        "a.b.c = 1\n[a.d]\ne = 2\n",
        "a = 0x1F\nb = 0o17\nc = 0b11\nd = 1_000\ne = inf\nf = -nan\n",
        "a = \"\\u00e9\\U0001F600\"\n",
        "a = 'unterminated\n",
        "= 1\n",
    ],
)
def test_edge_cases_read_alike(text: str) -> None:
    _agree(text)


def test_rings_of_equal_settings_each_get_their_own_policy(tmp_path: Path) -> None:
    """keymgr.config checks each distinct ring table once: rings with the same
    settings get equal policies under their own names; a ring that differs in
    one setting (here its publishers, or one duration) gets its own."""
    from datetime import timedelta

    from keymgr.config import load_config

    (tmp_path / "master.key").write_text("A" * 43 + "=\n")
    (tmp_path / "master.key").chmod(0o600)
    ring = (
        'backend = "local"\nalgorithm = "ES256"\nrotation_period = "30d"\n'
        'publish_ahead = "1h"\nretire_grace = "1d"\ndestroy_after = "7d"\n'
    )
    rings = "".join(
        f'[keyrings.t{i}]\n{ring}publishers = ["{"b" if i == 3 else "a"}"]\n'
        + ('history = "10d"\n' if i == 4 else "")
        for i in range(6)
    )
    cfg = tmp_path / "keymgr.toml"
    cfg.write_text(
        '[daemon]\nstate = "file:state.json"\naudit_log = "audit.jsonl"\n'
        '[backends.local]\ntype = "file"\npath = "keys"\nmaster_key_file = "master.key"\n'
        '[publishers.a]\ntype = "file"\npath = "a/jwks.json"\n'
        '[publishers.b]\ntype = "file"\npath = "b/jwks.json"\n' + rings
    )
    pols = load_config(cfg).policies
    assert [p.ring for p in pols.values()] == [f"t{i}" for i in range(6)] == list(pols)
    assert [p.publishers for p in pols.values()] == [("a",)] * 3 + [("b",)] + [("a",)] * 2
    assert [p.history for p in pols.values()] == [timedelta(days=90)] * 4 + [
        timedelta(days=10), timedelta(days=90)
    ]
    assert len({id(p) for p in pols.values()}) == 6
    assert all(p.rotation_period == timedelta(days=30) for p in pols.values())
