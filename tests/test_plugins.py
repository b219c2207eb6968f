"""Plug-ins are found through three entry-point groups, by one loader.

The built-in ones are also looked up directly (scanning every installed
distribution's entry points dominates a CLI command's start-up), so these tests
keep the shortcut and the entry points from drifting apart, and show that a
third-party plug-in registered only as an entry point is found, and that a
broken or wrong one is one clear line naming the config field.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import EntryPoint, entry_points

import pytest

from keymgr import plugins
from keymgr.backend import Backend
from keymgr.errors import ConfigError
from keymgr.plugins import BUILTIN, backend_class, publisher_class, store_factory
from keymgr.publishers import Publisher
from keymgr.stores import StateStore
from tests.conftest import REPO

GROUPS = sorted(BUILTIN)


@pytest.mark.parametrize("group", GROUPS)
def test_builtin_table_matches_pyproject_entry_points(group: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][group] == BUILTIN[group]


@pytest.mark.parametrize("group", GROUPS)
def test_installed_entry_points_name_every_builtin(group: str) -> None:
    installed = {ep.name: ep.value for ep in entry_points(group=group)}
    assert {k: installed.get(k) for k in BUILTIN[group]} == BUILTIN[group]


@pytest.mark.parametrize("name", sorted(BUILTIN[plugins.BACKENDS]))
def test_builtin_backends_are_backends(name: str) -> None:
    assert issubclass(backend_class(name, f"backends.x.type ({name})"), Backend)


@pytest.mark.parametrize("name", sorted(BUILTIN[plugins.PUBLISHERS]))
def test_builtin_publishers_are_publishers(name: str) -> None:
    assert issubclass(publisher_class(name, f"publishers.x.type ({name})"), Publisher)


def test_builtin_stores_make_stores(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:8200")  # no I/O: never contacted
    urls = {
        "file": f"file:{tmp_path / 'state.json'}",
        "s3": "s3://bucket/state.json",
        "vault": "vault://secret/keymgr/state",
        "gs": "gs://bucket/state.json",
        "azblob": "azblob://account/container/state.json",
    }
    assert set(urls) == set(BUILTIN[plugins.STORES])
    for scheme, url in urls.items():
        store = store_factory(scheme, "daemon.state")(url)
        assert isinstance(store, StateStore) and store.url == url


def test_builtins_live_under_keymgr_backends() -> None:
    """No generic top-level ``backends`` module is named (pyproject maps the
    folder to ``keymgr.backends``)."""
    for table in BUILTIN.values():
        for target in table.values():
            assert target.startswith("keymgr.backends."), target


def _only(monkeypatch, *fake: EntryPoint) -> None:
    def eps(group: str, name: str | None = None) -> list[EntryPoint]:
        return [e for e in fake if e.group == group and name in (None, e.name)]

    monkeypatch.setattr("importlib.metadata.entry_points", eps)


def test_third_party_plugins_found_through_their_entry_points(monkeypatch) -> None:
    _only(
        monkeypatch,
        EntryPoint("example-hsm", "keymgr.backends.local.keys:FileBackend", plugins.BACKENDS),
        EntryPoint("acme-cdn", "keymgr.backends.local.publisher:FilePublisher",
                   plugins.PUBLISHERS),
        EntryPoint("acme", "keymgr.backends.local.store:open_file_store", plugins.STORES),
    )
    assert backend_class("example-hsm", "backends.hsm.type").__name__ == "FileBackend"
    assert publisher_class("acme-cdn", "publishers.site.type").__name__ == "FilePublisher"
    assert store_factory("acme", "daemon.state").__name__ == "open_file_store"
    known = r"\(known: aws-kms, example-hsm, file, pkcs11, vault-transit\)$"
    with pytest.raises(ConfigError, match=r"^backends\.nope\.type: unknown backend type 'nope' "
                                          + known):
        backend_class("nope", "backends.nope.type")


def test_wrong_or_broken_plugins_are_one_line(monkeypatch) -> None:
    _only(
        monkeypatch,
        EntryPoint("not-a-backend", "keymgr.backends.local.publisher:FilePublisher",
                   plugins.BACKENDS),
        EntryPoint("missing", "keymgr_no_such_module:Thing", plugins.PUBLISHERS),
        EntryPoint("constant", "keymgr.plugins:BACKENDS", plugins.STORES),
    )
    with pytest.raises(ConfigError, match=r"^backends\.b\.type: entry point 'not-a-backend' "
                                          r"is not a keymgr backend$"):
        backend_class("not-a-backend", "backends.b.type")
    with pytest.raises(ConfigError, match=r"^publishers\.p\.type: plug-in 'missing' "
                                          r"\(keymgr_no_such_module:Thing\) cannot load: "):
        publisher_class("missing", "publishers.p.type")
    with pytest.raises(ConfigError, match=r"is not a keymgr state store$"):
        store_factory("constant", "daemon.state")


def test_wheel_installs_backends_under_keymgr(tmp_path) -> None:
    """The built distribution holds one top-level package, ``keymgr``, with every
    adapter of ``backends/`` under ``keymgr/backends/`` and the ``py.typed`` marker."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # a copy: setuptools writes build/ beside the project
    for name in ("keymgr", "backends"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("keymgr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"keymgr/{p.relative_to(REPO / 'keymgr').as_posix()}"
            for p in (REPO / "keymgr").rglob("*.py")}
    want |= {f"keymgr/backends/{p.relative_to(REPO / 'backends').as_posix()}"
             for p in (REPO / "backends").rglob("*.py")}
    assert want | {"keymgr/py.typed"} == {n for n in names if n.startswith("keymgr/")}
    top = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["keymgr"]
