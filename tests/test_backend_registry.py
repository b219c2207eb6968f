"""Backends are discovered through the ``keymgr.backends`` entry-point group.

The built-in ones are also looked up directly (scanning every installed
distribution's entry points dominates a CLI command's start-up), so these tests
keep the shortcut and the entry points from drifting apart, and show that a
third-party backend registered only as an entry point is found.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import EntryPoint, entry_points

import pytest

import backends
from backends import ENTRY_POINT_GROUP, Backend, backend_class
from keymgr.errors import KeymgrError
from tests.conftest import REPO


def test_builtin_table_matches_pyproject_entry_points() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][ENTRY_POINT_GROUP] == backends.BUILTIN


def test_installed_entry_points_name_every_builtin() -> None:
    installed = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {k: installed.get(k) for k in backends.BUILTIN} == backends.BUILTIN


@pytest.mark.parametrize("name", sorted(backends.BUILTIN))
def test_builtin_classes_are_backends(name: str) -> None:
    cls = backend_class(name, f"backends.x.type ({name})")
    assert issubclass(cls, Backend)


def test_third_party_backend_found_through_its_entry_point(monkeypatch) -> None:
    fake = EntryPoint("example-hsm", "backends.file:FileBackend", ENTRY_POINT_GROUP)

    def eps(group: str) -> list[EntryPoint]:
        return [fake] if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr("importlib.metadata.entry_points", eps)
    assert backend_class("example-hsm", "backends.hsm.type").__name__ == "FileBackend"
    with pytest.raises(KeymgrError, match=r"backends\.nope\.type"):
        backend_class("nope", "backends.nope.type")
