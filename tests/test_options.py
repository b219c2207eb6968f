"""keymgr.options: one reader, one wording, for a config table and a URL query alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from keymgr.errors import ConfigError
from keymgr.options import Options

KNOWN = ("path", "timeout", "retries", "verify", "mode", "name")


def message(make) -> str:
    with pytest.raises(ConfigError) as info:
        make()
    return str(info.value)


def test_table_and_query_read_the_same_values() -> None:
    table = Options({"timeout": 2.5, "retries": 3, "verify": False}, "backends.x", KNOWN)
    query = Options.query("timeout=2.5&retries=3&verify=false", "daemon.state", KNOWN)
    for o in (table, query):
        assert o.number("timeout", 10, 0.1, 300) == 2.5
        assert o.integer("retries", 2, 0, 10) == 3
        assert o.boolean("verify", True) is False
        assert o.number("absent", 7, 0, 10) == 7.0


@pytest.mark.parametrize(
    ("table", "query", "what"),
    [
        ({"colour": 1}, "colour=1", "colour: unknown option (known: mode, name, path, "
                                    "retries, timeout, verify)"),
        ({"timeout": "soon"}, "timeout=soon", "timeout: expected a number, got 'soon'"),
        ({"timeout": 0}, "timeout=0", "timeout: must be between 0.1 and 300, got 0"),
        ({"retries": 2.5}, "retries=2.5", "retries: expected an integer, got 2.5"),
        ({"retries": 11}, "retries=11", "retries: must be between 0 and 10, got 11"),
        ({"verify": "maybe"}, "verify=maybe", "verify: expected true or false, got 'maybe'"),
        ({"name": ""}, "name=", "name: expected a non-empty string, got ''"),
    ],
)
def test_one_wording_for_table_and_query(table, query, what) -> None:
    def read(o: Options) -> None:
        o.number("timeout", 10, 0.1, 300)
        o.integer("retries", 2, 0, 10)
        o.boolean("verify", True)
        o.string("name")

    got_table = message(lambda: read(Options(table, "backends.x", KNOWN)))
    got_query = message(lambda: read(Options.query(query, "daemon.state", KNOWN)))
    # The value's repr differs (TOML-typed vs text) only where the types do.
    assert got_table.startswith("backends.x.") and got_query.startswith("daemon.state?")
    assert got_table.split(": ", 1)[1].split(", got")[0] == what.split(": ", 1)[1].split(", got")[0]
    assert what.split(":")[0] in got_query


def test_query_refuses_a_repeated_name_and_hidden_names_stay_out_of_the_list() -> None:
    assert message(lambda: Options.query("name=a&name=b", "daemon.state", KNOWN)) == (
        "daemon.state?name: given twice"
    )
    o = Options({"token": "x"}, "backends.v", ("url",), hidden={"token"})
    assert "token" in o
    assert message(lambda: Options({"bogus": 1}, "backends.v", ("url",), hidden={"token"})) == (
        "backends.v.bogus: unknown option (known: url)"
    )


def test_required_choice_and_paths(tmp_path, monkeypatch) -> None:
    o = Options({"mode": "b", "path": "keys"}, "backends.x", KNOWN, config_dir=str(tmp_path))
    assert o.required("path") == "keys"
    assert o.path("path") == tmp_path / "keys"
    assert message(lambda: o.required("name", "e.g. 'a'")) == (
        "backends.x.name: is required (e.g. 'a')"
    )
    assert o.choice("mode", "a", ("a", "b")) == "b"
    assert message(lambda: o.choice("mode", "a", ("a", "c"))) == (
        "backends.x.mode: expected one of a, c, got 'b'"
    )
    monkeypatch.setenv("KEYMGR_TEST_NAME", " from-env ")
    assert o.string("name", env="KEYMGR_TEST_NAME") == "from-env"
    monkeypatch.setenv("KEYMGR_TEST_PATH", "rel/file")
    # A path from the environment is the process's, not relative to the config.
    assert o.path("name", env="KEYMGR_TEST_PATH") == Path("rel/file")
