"""Load and validate ``keymgr.toml``.

Every error names the file, the field and what is wrong, in one line, and is
raised before anything is touched (exit code 2). Unknown fields are errors too:
a misspelt ``retire_grce`` silently falling back to a default is exactly the
kind of surprise that breaks a rotation months later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keymgr.backend import Backend
from keymgr.discovery import ISSUER_OPTIONS, Discovery, IssuerOptions, issuer_options
from keymgr.discovery import configure as configure_issuers
from keymgr.errors import ConfigError
from keymgr.fsutil import NotAFile, read_file
from keymgr.jose import ALGORITHMS
from keymgr.model import gc_paused
from keymgr.planner import Policy
from keymgr.plugins import backend_class, publisher_class
from keymgr.probes import EDGE_OPTIONS, EdgeSettings, edge_settings
from keymgr.publishers import AUTO, AutoCacheControl, Publisher
from keymgr.timefmt import format_duration, parse_duration

if TYPE_CHECKING:
    from keymgr.notify import NotifySettings
    from keymgr.service_config import ServiceSettings

#: ``max-age=N`` / ``s-maxage=N`` in a Cache-Control value (a CDN honours s-maxage).
MAX_AGE_RE = re.compile(r"(?:^|,)\s*(?:s-maxage|max-age)\s*=\s*\"?(\d+)\"?\s*(?=,|$)", re.I)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PORT_RE = re.compile(r"[0-9]{1,5}")
#: A host name (RFC 1123), an IPv4 address, or a bracketed IPv6 address.
HOST_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")
DEFAULT_CONFIG = "keymgr.toml"
#: ``cache_control = "auto"``: max-age = publish_ahead / AUTO_DIVISOR, at most
#: AUTO_CAP, ± AUTO_JITTER (docs/issuer.md#cache-control-auto).
AUTO_DIVISOR = 4
AUTO_CAP = timedelta(days=1)
AUTO_JITTER = 0.1

DAEMON_FIELDS = {
    "state": "file:state.json",
    "audit_log": "audit.jsonl",
    "reconcile_interval": "60s",
    "listen": "127.0.0.1:9464",
    "log_level": "info",
    "lease_ttl": "30s",
}
#: ``[daemon] ui``: the read-only operator page (keymgr.ui) on ``listen``:
#: false (the default: not served), true (at UI_PATH), or the path to serve it at.
UI_PATH = "/ui"
_UI_PATH_RE = re.compile(r"/[A-Za-z0-9._~/-]{0,127}")
#: ``[audit]``: signed checkpoints of the audit log (keymgr.checkpoint).
AUDIT_FIELDS = {"backend": None, "algorithm": "ES256", "rotation_period": "90d"}
#: The ring the audit key lives under in its backend: reserved, no
#: ``[keyrings.*]`` may use it (it passes every backend's ring-name rule).
AUDIT_RING = "keymgr-audit"
RING_FIELDS = {
    "backend",
    "algorithm",
    "rotation_period",
    "publish_ahead",
    "retire_grace",
    "destroy_after",
    "history",
    "publishers",
}
#: ``keyrings.NAME.history``: how long a destroyed key's full record stays in
#: the state (keymgr.planner.Policy.history).
DEFAULT_HISTORY = "90d"


@dataclass(frozen=True)
class DaemonConfig:
    state: str
    audit_log: Path
    reconcile_interval: timedelta
    listen: tuple[str, int]
    log_level: str
    lease_ttl: timedelta
    #: ``ui``: the path of the operator page (keymgr.ui), or None when off.
    ui: str | None = None
    #: ``audit``: where the audit chain is kept: "store" (a shared state
    #: store's objects; its default), or "file" (``audit_log``; the only
    #: choice with a file state store). See keymgr.auditstore.
    audit: str | None = None
    #: Whether ``audit_log`` was set (with the store as the record, it is
    #: then a mirror; unset, nothing is written locally).
    audit_log_set: bool = True


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: which backend holds the audit key, its algorithm and rotation."""

    backend: str
    algorithm: str
    rotation_period: timedelta


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    backends: Mapping[str, Backend]
    publishers: Mapping[str, Publisher]
    policies: Mapping[str, Policy]
    #: Per publisher, its ``cache_control`` option as configured (None when absent).
    cache_control: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    #: ``[audit]`` (signed checkpoints), or None when the table is absent.
    audit: AuditSettings | None = None
    #: ``[notify]`` (webhooks, keymgr.notify), or None when the table is absent.
    notify: NotifySettings | None = None
    #: ``[service]`` (the local signing service, keymgr.service), or None: off.
    service: ServiceSettings | None = None
    #: Per publisher with ``verify_urls``, its edges and how to probe them.
    edges: Mapping[str, EdgeSettings] = dataclasses.field(default_factory=dict)
    #: Per publisher that writes an OpenID Connect discovery document (keymgr.discovery).
    discovery: Mapping[str, Discovery] = dataclasses.field(default_factory=dict)
    #: Per ring whose publishers name an ``issuer``: that issuer (``iss`` of ``keymgr sign``).
    issuers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Per publisher with ``cache_control = "auto"``: the max-age derived for it.
    auto_cache_control: Mapping[str, AutoCacheControl] = dataclasses.field(default_factory=dict)
    #: What the config was read from: :func:`config_identity` of its path and
    #: bytes ("" when not read from a file). ``keymgr status`` compares it with
    #: the daemon's before taking the daemon's answer (keymgr.status_client).
    identity: str = ""

    def edge_urls(self) -> dict[str, tuple[str, ...]]:
        """The URLs probed for each publisher, for the planner."""
        return {n: e.urls for n, e in self.edges.items()}

    @property
    def dir(self) -> Path:
        return self.path.parent


def resolve_config_path(arg: str | None) -> Path:
    """``--config``, else ``$KEYMGR_CONFIG``, else ``./keymgr.toml``."""
    return Path(arg or os.environ.get("KEYMGR_CONFIG") or DEFAULT_CONFIG)


class _Ctx:
    def __init__(self, path: Path) -> None:
        self.path = path

    def err(self, field: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {field}: {what}")

    def table(self, doc: Mapping[str, Any], key: str, field: str) -> dict[str, Any]:
        v = doc.get(key, {})
        if not isinstance(v, dict):
            raise self.err(field, "must be a table")
        return v

    def string(self, tbl: Mapping[str, Any], key: str, field: str) -> str:
        v = tbl.get(key)
        if v is None:
            raise self.err(field, "is required")
        if not isinstance(v, str) or not v.strip():
            raise self.err(field, f"must be a non-empty string, got {v!r}")
        return v

    def duration(self, tbl: Mapping[str, Any], key: str, field: str) -> timedelta:
        raw = self.string(tbl, key, field)
        try:
            return parse_duration(raw)
        except ValueError as e:
            raise self.err(field, str(e)) from None

    def unknown(
        self, tbl: Mapping[str, Any], allowed: set[str] | Mapping[str, Any], prefix: str
    ) -> None:
        for k in tbl:
            if k not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.err(f"{prefix}{k}", f"unknown option (known: {known})")

    def name(self, name: str, field: str) -> None:
        if not NAME_RE.fullmatch(name):
            raise self.err(field, f"bad name {name!r} (letters, digits, '_', '.', '-')")


def _listen(ctx: _Ctx, raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not HOST_RE.fullmatch(host) or not PORT_RE.fullmatch(port) or int(port) > 65535:
        raise ctx.err("daemon.listen", f"expected HOST:PORT, got {raw!r}")
    return host.strip("[]"), int(port)


def parse_toml(text: str) -> dict[str, Any]:
    """The TOML document ``text``; tomllib.TOMLDecodeError when it is not TOML.

    rtoml (Rust) parses it when installed: a config of 100,000 rings takes
    0.7 s instead of 5.4 s with tomllib (benchmarks/bench_scale.py). Anything
    rtoml refuses goes to tomllib, which parses what it accepts and words the
    error otherwise, so the messages stay tomllib's (tests/bad_configs), and
    tests/test_config_toml.py checks both parsers agree on every TOML file of
    the project.
    """
    try:
        import rtoml
    except ImportError:  # pragma: no cover - a dependency; kept optional for embedding
        return tomllib.loads(text)
    try:
        doc: dict[str, Any] = rtoml.loads(text)
    except Exception:  # any refusal: tomllib has the last word
        return tomllib.loads(text)
    return doc


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        raw = read_file(path)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (run 'keymgr init' to create one)"
        ) from None
    except NotAFile as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        with gc_paused():
            doc = parse_toml(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: bad TOML: {e}") from None
    return dataclasses.replace(parse_config(doc, path), identity=config_identity(path, raw))


def config_identity(path: Path, raw: bytes) -> str:
    """SHA-256 of the config's absolute path and bytes: two processes with the
    same identity resolve every relative path and every setting alike."""
    h = hashlib.sha256(os.fsencode(os.path.abspath(path)))
    h.update(b"\0")
    h.update(raw)
    return h.hexdigest()


def _audit_record(ctx: _Ctx, value: Any, state_url: str) -> str | None:
    """``[daemon] audit``: "store" or "file"; "store" needs a shared state store."""
    if value is None:
        return None
    if value not in ("store", "file"):
        raise ctx.err("daemon.audit", f'expected "store" or "file", got {value!r}')
    if value == "store" and state_url.startswith("file:"):
        raise ctx.err(
            "daemon.audit", '"store" needs a shared state store (s3://, vault://, gs://, ...)'
        )
    return str(value)


def parse_config(doc: Mapping[str, Any], path: Path) -> Config:
    ctx = _Ctx(path)
    base = path.parent
    ctx.unknown(
        doc, {"daemon", "backends", "publishers", "keyrings", "audit", "notify", "service"}, ""
    )

    d = ctx.table(doc, "daemon", "daemon")
    ctx.unknown(d, {*DAEMON_FIELDS, "ui", "audit"}, "daemon.")
    merged = {**DAEMON_FIELDS, **d}
    for k in DAEMON_FIELDS:
        ctx.string(merged, k, f"daemon.{k}")
    interval = ctx.duration(merged, "reconcile_interval", "daemon.reconcile_interval")
    if interval < timedelta(seconds=1):
        raise ctx.err("daemon.reconcile_interval", "must be at least 1s")
    lease_ttl = ctx.duration(merged, "lease_ttl", "daemon.lease_ttl")
    if lease_ttl < timedelta(seconds=3):
        raise ctx.err("daemon.lease_ttl", "must be at least 3s")
    if merged["log_level"].lower() not in ("debug", "info", "warning", "error"):
        raise ctx.err("daemon.log_level", "must be one of debug, info, warning, error")
    from keymgr.stores import check_state_url

    try:
        state_url = check_state_url(merged["state"], base)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    audit = Path(merged["audit_log"])
    daemon = DaemonConfig(
        state=state_url,
        audit_log=audit if audit.is_absolute() else base / audit,
        reconcile_interval=interval,
        listen=_listen(ctx, merged["listen"]),
        log_level=merged["log_level"].lower(),
        lease_ttl=lease_ttl,
        ui=_ui_path(ctx, d.get("ui", False)),
        audit=_audit_record(ctx, d.get("audit"), state_url),
        audit_log_set="audit_log" in d,
    )

    backends: dict[str, Backend] = {}
    for name, tbl in ctx.table(doc, "backends", "backends").items():
        where = f"backends.{name}"
        ctx.name(name, where)
        if not isinstance(tbl, dict):
            raise ctx.err(where, "must be a table")
        cls = backend_class(ctx.string(tbl, "type", f"{where}.type"), f"{path}: {where}.type")
        try:
            backends[name] = cls(name, tbl, str(base))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    publishers: dict[str, Publisher] = {}
    edges: dict[str, EdgeSettings] = {}
    issuer_opts: dict[str, IssuerOptions] = {}
    cache_control: dict[str, str | None] = {}
    for name, tbl in ctx.table(doc, "publishers", "publishers").items():
        where = f"publishers.{name}"
        ctx.name(name, where)
        if not isinstance(tbl, dict):
            raise ctx.err(where, "must be a table")
        pcls = publisher_class(ctx.string(tbl, "type", f"{where}.type"), f"{path}: {where}.type")
        try:
            # Edges (verify_urls) are any publisher's, read here, not by the plug-in.
            edges[name] = edge_settings(tbl, where)
            # So are the issuer options (keymgr.discovery).
            issuer_opts[name] = issuer_options(tbl, where)
            own = {k: v for k, v in tbl.items() if k not in EDGE_OPTIONS | ISSUER_OPTIONS}
            publishers[name] = pcls(name, own, str(base))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        cache_control[name] = _cache_control(publishers[name], tbl)

    policies: dict[str, Policy] = {}
    rings = ctx.table(doc, "keyrings", "keyrings")
    if not rings:
        raise ctx.err("keyrings", "at least one key ring is required")
    names = {n: n for n in [*backends, *publishers]}
    # The rings of a multi-tenant deployment share a few sets of settings:
    # each distinct table is checked once, and each ring of it gets the same
    # settings under its own name (100,000 rings of 100 tables: 1.75 -> 1.45 s).
    # A checked table keeps its policy's settings but the ring name: one call
    # with them is 40% faster than dataclasses.replace, 100,000 times.
    checked: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name, tbl in rings.items():
        if name == AUDIT_RING:
            raise ctx.err(f"keyrings.{name}", "reserved for the audit key ([audit]); rename it")
        name = _detached(name)
        key = _settings_key(tbl)
        same = checked.get(key) if key is not None else None
        if same is None:
            policies[name] = _ring(ctx, name, tbl, backends, publishers, names)
            if key is not None and len(checked) < 4096:
                checked[key] = _settings_of(policies[name])
        else:
            ctx.name(name, f"keyrings.{name}")
            policies[name] = Policy(ring=name, **same)
    # After the rings: both derive from the rings each publisher serves. The
    # auto Cache-Control first, so a discovery document's publisher copies it.
    auto = _auto_cache_control(publishers, cache_control, policies)
    try:
        discovery, issuers = configure_issuers(publishers, issuer_opts, policies)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    audit_settings = _audit(ctx, doc, backends)
    notify = None
    if "notify" in doc:  # keymgr.notify is imported only by configs that use it
        from keymgr.notify import parse_notify

        try:
            notify = parse_notify(doc, base)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    service = None
    if "service" in doc:  # keymgr.service_config is imported only by configs that use it
        from keymgr.service_config import parse_service

        try:
            service = parse_service(doc, base, policies)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    _check_collisions(ctx, path, daemon, backends, publishers)
    config = Config(
        path=path,
        daemon=daemon,
        backends=backends,
        publishers=publishers,
        policies=policies,
        cache_control=cache_control,
        audit=audit_settings,
        notify=notify,
        service=service,
        edges={n: e for n, e in edges.items() if e.urls},
        discovery=discovery,
        issuers=issuers,
        auto_cache_control=auto,
    )
    return config


def _ui_path(ctx: _Ctx, raw: Any) -> str | None:
    """``[daemon] ui``: false, true (UI_PATH) or a path such as "/ops/keys"."""
    if raw is False:
        return None
    if raw is True:
        return UI_PATH
    if not isinstance(raw, str) or not _UI_PATH_RE.fullmatch(raw):
        raise ctx.err("daemon.ui", f"expected true, false or a path like {UI_PATH!r}, got {raw!r}")
    if raw in ("/healthz", "/readyz", "/metrics"):
        raise ctx.err("daemon.ui", f"{raw} is the daemon's own endpoint; choose another path")
    return raw


def _audit(
    ctx: _Ctx, doc: Mapping[str, Any], backends: Mapping[str, Backend]
) -> AuditSettings | None:
    """``[audit]``, or None when absent (the log is then hash-chained, not signed)."""
    if "audit" not in doc:
        return None
    tbl = ctx.table(doc, "audit", "audit")
    ctx.unknown(tbl, AUDIT_FIELDS, "audit.")
    backend = ctx.string(tbl, "backend", "audit.backend")
    if backend not in backends:
        raise ctx.err(
            "audit.backend", f"unknown backend {backend!r} (define [backends.{backend}])"
        )
    merged = {**AUDIT_FIELDS, **tbl}
    alg = ctx.string(merged, "algorithm", "audit.algorithm")
    if alg not in ALGORITHMS:
        raise ctx.err(
            "audit.algorithm",
            f"unknown algorithm {alg!r} (one of {', '.join(sorted(ALGORITHMS))})",
        )
    if alg not in type(backends[backend]).algorithms:
        raise ctx.err("audit.algorithm", f"{alg} is not supported by backend {backend!r}")
    period = ctx.duration(merged, "rotation_period", "audit.rotation_period")
    if period <= timedelta(0):
        raise ctx.err("audit.rotation_period", "must be longer than zero")
    return AuditSettings(backend=backend, algorithm=alg, rotation_period=period)


def _cache_control(pub: Publisher, options: Mapping[str, Any]) -> str | None:
    """The Cache-Control a publisher's JWKS is served with: its ``cache_control``.

    The value the publisher resolved (which includes its default, e.g. the S3
    publisher's) wins over the raw option; any publisher type may have one.
    """
    for v in (getattr(pub, "cache_control", None), options.get("cache_control")):
        if isinstance(v, str):
            return v
    return None


def _auto_cache_control(
    publishers: Mapping[str, Publisher],
    cache_control: Mapping[str, str | None],
    policies: Mapping[str, Policy],
) -> dict[str, AutoCacheControl]:
    """``cache_control = "auto"``: derive each such publisher's max-age.

    A quarter of the shortest ``publish_ahead`` of the rings it serves (of
    every ring when none uses it any more), at most a day, ±10 % jitter: a
    verifier, and a CDN in front of it, each refetch well within A
    (docs/issuer.md#cache-control-auto).
    """
    out: dict[str, AutoCacheControl] = {}
    for name, value in cache_control.items():
        if value != AUTO:
            continue
        rings = [p for p in policies.values() if name in p.publishers] or list(policies.values())
        ahead = min(p.publish_ahead for p in rings)
        base = min(ahead / AUTO_DIVISOR, AUTO_CAP)
        auto = AutoCacheControl(
            base=int(base.total_seconds()),
            publish_ahead=ahead,
            rings=tuple(sorted(p.ring for p in rings if p.publish_ahead == ahead)),
            jitter=AUTO_JITTER,
        )
        publishers[name].auto_cache_control = auto
        out[name] = auto
    return out


def cache_control_notes(cfg: Config) -> list[str]:
    """One line per ``cache_control = "auto"`` publisher: the value and why."""
    out = []
    for name, auto in cfg.auto_cache_control.items():
        pub = cfg.publishers[name]
        capped = auto.publish_ahead / AUTO_DIVISOR > AUTO_CAP
        basis = (
            f"{'capped at ' + format_duration(AUTO_CAP) + ', ' if capped else ''}"
            f"1/{AUTO_DIVISOR} of publish_ahead {format_duration(auto.publish_ahead)} "
            f"(the shortest of ring(s) {', '.join(auto.rings)}), "
            f"±{round(auto.jitter * 100)}%"
        )
        field = f"{cfg.path}: publishers.{name}.cache_control"
        if type(pub).headers_per_document:
            lo, hi = auto.bounds()
            out.append(
                f"{field}: auto = 'public, max-age=N' with N from {lo} to {hi}: {basis}, "
                "chosen per document by its content (unchanged while its keys are), "
                "sent with every upload"
            )
        else:
            value = pub.headers_for(b"").get("Cache-Control", auto.value(name.encode()))
            out.append(
                f"{field}: auto = {value!r}: {basis}, fixed per publisher; make the static "
                f"server send 'Cache-Control: {value}' with the documents"
            )
    return out


def max_age(cache_control: str | None) -> timedelta | None:
    """The longest ``max-age`` / ``s-maxage`` of a Cache-Control value, if any."""
    ages = [int(m) for m in MAX_AGE_RE.findall(cache_control or "")]
    return timedelta(seconds=max(ages)) if ages else None


def config_warnings(cfg: Config) -> list[str]:
    """Settings that load but break the rollover promise: one line each.

    A verifier (or CDN) may cache the JWKS for the publisher's Cache-Control
    max-age; a ring whose ``publish_ahead`` is shorter can start signing with a
    key those caches do not hold yet, and verifiers reject its tokens.
    """
    out = []
    for ring, pol in cfg.policies.items():
        for name in pol.publishers:
            age = max_age(cfg.cache_control.get(name))
            if age is not None and pol.publish_ahead < age:
                out.append(
                    f"{cfg.path}: keyrings.{ring}.publish_ahead: "
                    f"{format_duration(pol.publish_ahead)} is shorter than the Cache-Control "
                    f"max-age of publishers.{name} ({format_duration(age)}): verifiers may "
                    "still cache the old JWKS when a new key starts signing"
                )
    return out


def _detached(text: str) -> str:
    """A new string equal to ``text`` (``str(text)`` would return ``text`` itself).

    A policy must hold no object of the parsed TOML document: one string
    kept per ring (its name) pins every block of the document's heap it sits
    in, and at 100,000 rings the parsed document is 240 MB of which 100 MB
    stayed resident that way after it was freed (benchmarks/bench_scale.py).
    So names are copied, and the other strings of a policy are the ones of
    the backend and publisher tables and of keymgr.jose.ALGORITHMS.
    """
    return text.encode().decode()


_ALGORITHM = {a: a for a in ALGORITHMS}


_POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(Policy) if f.name != "ring")


def _settings_of(policy: Policy) -> dict[str, Any]:
    """Every field of ``policy`` but ``ring``: ``Policy(ring=name, **these)``."""
    return {f: getattr(policy, f) for f in _POLICY_FIELDS}


def _settings_key(tbl: Any) -> tuple[Any, ...] | None:
    """A ring's table as a hashable value equal only for a table of equal
    settings (a list as a tuple: valid settings are strings and lists of
    strings), or None for anything else."""
    if type(tbl) is not dict:
        return None
    key = (*tbl, *[tuple(v) if type(v) is list else v for v in tbl.values()])
    try:
        hash(key)
    except TypeError:  # a table or a list of lists: left to _ring to name
        return None
    return key


def _ring(
    ctx: _Ctx,
    name: str,
    tbl: Any,
    backends: Mapping[str, Backend],
    publishers: Mapping[str, Publisher],
    names: Mapping[str, str],
) -> Policy:
    """The policy of ring ``name``; ``names``: each backend and publisher
    name, to itself (the strings a policy holds, see :func:`_detached`)."""
    where = f"keyrings.{name}"
    ctx.name(name, where)
    if not isinstance(tbl, dict):
        raise ctx.err(where, "must be a table")
    ctx.unknown(tbl, RING_FIELDS, f"{where}.")
    backend = ctx.string(tbl, "backend", f"{where}.backend")
    if backend not in backends:
        raise ctx.err(
            f"{where}.backend", f"unknown backend {backend!r} (define [backends.{backend}])"
        )
    alg = ctx.string(tbl, "algorithm", f"{where}.algorithm")
    if alg not in ALGORITHMS:
        raise ctx.err(
            f"{where}.algorithm",
            f"unknown algorithm {alg!r} (one of {', '.join(sorted(ALGORITHMS))})",
        )
    if alg not in type(backends[backend]).algorithms:
        raise ctx.err(f"{where}.algorithm", f"{alg} is not supported by backend {backend!r}")
    durations = {}
    for f in ("rotation_period", "publish_ahead", "retire_grace", "destroy_after"):
        durations[f] = ctx.duration(tbl, f, f"{where}.{f}")
    if durations["rotation_period"] <= timedelta(0):
        raise ctx.err(f"{where}.rotation_period", "must be longer than zero")
    if durations["publish_ahead"] <= timedelta(0):
        raise ctx.err(
            f"{where}.publish_ahead",
            "must be longer than zero (at least the verifiers' JWKS cache lifetime)",
        )
    if durations["publish_ahead"] > durations["rotation_period"]:
        raise ctx.err(f"{where}.publish_ahead", "must not be longer than rotation_period")
    if durations["retire_grace"] <= timedelta(0):
        raise ctx.err(
            f"{where}.retire_grace",
            "must be longer than zero (at least the longest token lifetime)",
        )
    durations["history"] = ctx.duration(
        {"history": DEFAULT_HISTORY, **tbl}, "history", f"{where}.history"
    )
    pubs = tbl.get("publishers")
    if pubs is None:
        raise ctx.err(f"{where}.publishers", "is required")
    if not isinstance(pubs, list) or not pubs or not all(isinstance(p, str) for p in pubs):
        raise ctx.err(f"{where}.publishers", "must be a non-empty list of publisher names")
    for p in pubs:
        if p not in publishers:
            raise ctx.err(
                f"{where}.publishers", f"unknown publisher {p!r} (define [publishers.{p}])"
            )
    if len(set(pubs)) != len(pubs):
        raise ctx.err(f"{where}.publishers", "lists a publisher twice")
    return Policy(
        ring=name,
        # The strings of the backend and publisher tables, not the ring's
        # (see _detached): equal strings, so either name's will do.
        backend=names[backend],
        algorithm=_ALGORITHM[alg],
        publishers=tuple(names[p] for p in pubs),
        **durations,
    )


def _check_collisions(
    ctx: _Ctx,
    path: Path,
    daemon: DaemonConfig,
    backends: Mapping[str, Backend],
    publishers: Mapping[str, Publisher],
) -> None:
    """Refuse two roles on one file: a JWKS written over the master key loses every key."""
    files: list[tuple[str, Path]] = [("(the config file itself)", path)]
    if daemon.state.startswith("file:"):
        from keymgr.stores import file_state_path

        state = file_state_path(daemon.state)
        files += [("daemon.state", state), ("daemon.state", state.with_name(state.name + ".lock"))]
    files.append(("daemon.audit_log", daemon.audit_log))
    dirs: list[tuple[str, Path]] = []
    for name, b in backends.items():
        for opt, p in b.paths().items():
            (dirs if opt == "path" else files).append((f"backends.{name}.{opt}", p))
    for name, pub in publishers.items():
        files.extend((f"publishers.{name}.{opt}", p) for opt, p in pub.paths().items())
    seen: dict[Path, str] = {}
    for field, p in files:
        r = p.resolve()
        if r in seen and seen[r] != field:
            raise ctx.err(field, f"{p} is also used by {seen[r]}")
        seen[r] = field
        for dfield, d in dirs:
            if r == d.resolve() or r.is_relative_to(d.resolve()):
                raise ctx.err(field, f"{p} is inside the key directory of {dfield}")
