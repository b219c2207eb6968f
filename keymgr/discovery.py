"""A static issuer: the OpenID Connect discovery document beside the JWKS.

A publisher with ``issuer`` names the issuer of the rings it serves (``keymgr
sign`` fills ``iss`` from it). When its plug-in is also told where the
discovery document goes (``discovery_path`` for ``file``, ``discovery_key``
for ``s3``: :meth:`keymgr.publishers.Publisher.sibling`), keymgr writes
``/.well-known/openid-configuration`` there too::

    {"issuer": ..., "jwks_uri": ...,
     "id_token_signing_alg_values_supported": [the algorithms of the keys in the JWKS],
     "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
     ...the operator's discovery_extra}

The document is a function of the configuration and of the JWKS it points to,
so it is written in the same publish, **after** the JWKS is confirmed, and
the publisher's record confirms the pair (:func:`pair_digest`): verifiers
never see the document advertise an algorithm before its key is in the JWKS,
nor drop one while a key of it is still there (docs/issuer.md#consistency).

The options ``issuer``, ``jwks_uri`` and ``discovery_extra`` belong to every
publisher, whatever its type: keymgr.config reads them here and hands the
plug-in its table without them (like ``verify_urls``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from keymgr.errors import ConfigError
from keymgr.options import Options
from keymgr.publishers import Publisher, Served

if TYPE_CHECKING:
    from keymgr.planner import Policy

#: The name a plug-in knows the discovery document by (Publisher.sibling).
DISCOVERY = "openid-configuration"
#: Publisher options read by keymgr.config, not by the plug-in.
ISSUER_OPTIONS = frozenset({"issuer", "jwks_uri", "discovery_extra"})
#: Fields keymgr computes; ``discovery_extra`` may not set them.
COMPUTED = {
    "issuer": "it is publishers.NAME.issuer",
    "jwks_uri": "it is publishers.NAME.jwks_uri",
    "id_token_signing_alg_values_supported": "it is the algorithms of the keys in the JWKS",
}
#: Fields OpenID Connect Discovery requires, with the least a static issuer
#: can claim: ID tokens handed out directly (no code exchange at a token
#: endpoint keymgr knows of), and one ``sub`` per subject for every client.
#: ``discovery_extra`` may replace them (a full provider supporting ``code``).
DEFAULTS: Mapping[str, list[str]] = {
    "response_types_supported": ["id_token"],
    "subject_types_supported": ["public"],
}
_SUBJECT_TYPES = frozenset({"public", "pairwise"})
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class IssuerOptions:
    """A publisher's ``issuer``, ``jwks_uri`` and ``discovery_extra``, checked."""

    issuer: str | None = None
    jwks_uri: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Discovery:
    """What a publisher's discovery document says, and who writes it."""

    #: The plug-in's sibling publisher that writes and reads back the document.
    publisher: Publisher
    issuer: str
    jwks_uri: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The configured algorithms of the rings the publisher serves: advertised
    #: only while its JWKS holds no key at all (the field may not be empty).
    fallback_algs: tuple[str, ...] = ()

    def fields(self, jwks_body: bytes) -> dict[str, Any]:
        """The document for the JWKS ``jwks_body`` (as a dict)."""
        doc: dict[str, Any] = {k: list(v) for k, v in DEFAULTS.items()}
        doc.update(self.extra)
        doc["issuer"] = self.issuer
        doc["jwks_uri"] = self.jwks_uri
        doc["id_token_signing_alg_values_supported"] = (
            algorithms(jwks_body) or sorted(self.fallback_algs)
        )
        return doc

    def document(self, jwks_body: bytes) -> bytes:
        """The document's bytes: deterministic (members sorted), like the JWKS."""
        return encode(self.fields(jwks_body))


def encode(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("ascii")


def algorithms(jwks_body: bytes) -> list[str]:
    """The ``alg`` of every key in a JWKS document, sorted, once each."""
    try:
        doc = json.loads(jwks_body)
    except ValueError:
        return []
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        return []
    return sorted({k["alg"] for k in keys if isinstance(k, dict) and isinstance(k.get("alg"), str)})


def pair_digest(jwks: Served, doc: Served) -> str:
    """What a publisher with a discovery document confirms: both documents.

    Recorded as the publisher's ``sha256``, so a discovery document edited,
    reverted or deleted out of band breaks continuity like a changed JWKS
    (keymgr.reconciler.observe), and the next pass writes it again.
    """
    return hashlib.sha256(f"{jwks.digest()}\n{doc.digest()}".encode()).hexdigest()


def issuer_options(options: Mapping[str, Any], where: str) -> IssuerOptions:
    """Read a publisher table's issuer options (ConfigError naming ``where.FIELD``)."""
    o = Options({k: v for k, v in options.items() if k in ISSUER_OPTIONS}, where, ISSUER_OPTIONS)
    issuer = o.string("issuer")
    if issuer is not None:
        problem = _url_problem(issuer, query=False)
        if problem is not None:
            raise o.err("issuer", f"{issuer!r}: {problem}")
    jwks_uri = o.string("jwks_uri")
    if jwks_uri is not None:
        problem = _url_problem(jwks_uri, query=True)
        if problem is not None:
            raise o.err("jwks_uri", f"{jwks_uri!r}: {problem}")
    raw = o.raw("discovery_extra", {})
    if not isinstance(raw, dict):
        raise o.err("discovery_extra", "must be a table of extra discovery fields")
    extra: dict[str, Any] = {}
    for name, value in raw.items():
        fname = f"discovery_extra.{name}"
        if name in COMPUTED:
            what = COMPUTED[name].replace("NAME", where.split(".", 1)[-1])
            raise o.err(fname, f"computed by keymgr ({what}); remove it here")
        problem = _json_problem(value)
        if problem is not None:
            raise o.err(fname, problem)
        if name in DEFAULTS and (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise o.err(fname, f"expected a non-empty list of strings, got {value!r}")
        if name == "subject_types_supported" and not set(value) <= _SUBJECT_TYPES:
            raise o.err(fname, f"expected 'public' and/or 'pairwise', got {value!r}")
        extra[name] = value
    return IssuerOptions(issuer=issuer, jwks_uri=jwks_uri, extra=extra)


def configure(
    publishers: Mapping[str, Publisher],
    options: Mapping[str, IssuerOptions],
    policies: Mapping[str, Policy],
) -> tuple[dict[str, Discovery], dict[str, str]]:
    """Each publisher's discovery document, and each ring's issuer.

    A publisher writes a discovery document when its plug-in was told where
    (``sibling`` is not None); that needs ``issuer`` and ``jwks_uri``, and
    ``jwks_uri`` / ``discovery_extra`` need a discovery document. A ring's
    issuer is the one its publishers name; publishers of one ring naming
    different issuers are an error naming the ring.
    """
    discovery: dict[str, Discovery] = {}
    for name, pub in publishers.items():
        opts = options.get(name, IssuerOptions())
        where = f"publishers.{name}"
        option = type(pub).document_options.get(DISCOVERY)
        doc = pub.sibling(DISCOVERY) if type(pub).supports_documents else None
        if doc is None:
            for fld, given in (("jwks_uri", opts.jwks_uri), ("discovery_extra", opts.extra)):
                if given:
                    how = (
                        f"set {where}.{option} too"
                        if option is not None and type(pub).supports_documents
                        else f"publisher type {pub.type_name!r} cannot serve it"
                    )
                    raise ConfigError(
                        f"{where}.{fld}: only used in the discovery document ({how})"
                    )
            continue
        for fld, given in (("issuer", opts.issuer), ("jwks_uri", opts.jwks_uri)):
            if given is None:
                raise ConfigError(
                    f"{where}.{fld}: is required with {where}.{option or 'its discovery option'} "
                    "(the discovery document carries it)"
                )
        assert opts.issuer is not None and opts.jwks_uri is not None
        algs = sorted({p.algorithm for p in policies.values() if name in p.publishers})
        discovery[name] = Discovery(
            publisher=doc,
            issuer=opts.issuer,
            jwks_uri=opts.jwks_uri,
            extra=dict(opts.extra),
            fallback_algs=tuple(algs),
        )
    issuers: dict[str, str] = {}
    for ring, pol in policies.items():
        named = {p: i for p in pol.publishers if (i := options.get(p, IssuerOptions()).issuer)}
        if len(set(named.values())) > 1:
            which = ", ".join(f"publishers.{p}.issuer {i!r}" for p, i in sorted(named.items()))
            raise ConfigError(
                f"keyrings.{ring}.publishers: its publishers name different issuers ({which}); "
                "a ring's tokens carry one iss: give them one issuer, or split the ring"
            )
        if named:
            issuers[ring] = next(iter(named.values()))
    return discovery, issuers


def _url_problem(url: str, *, query: bool) -> str | None:
    if any(c.isspace() for c in url):
        return "must not contain whitespace"
    parts = urlsplit(url)
    host = parts.hostname
    if not host or not (
        parts.scheme == "https" or (parts.scheme == "http" and host in _LOOPBACK)
    ):
        return "expected an https URL (http only for localhost)"
    if parts.username or parts.password:
        return "must not carry credentials"
    if parts.fragment or url.endswith("#"):
        return "must not have a '#' fragment"
    if not query and (parts.query or "?" in url):
        return "must not have a '?' query (OpenID Connect Discovery, section 3)"
    return None


def _json_problem(value: Any) -> str | None:
    """Why a TOML value cannot go into a JSON document, or None."""
    if isinstance(value, bool | str | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"expected a finite number, got {value!r}"
    if isinstance(value, list):
        for v in value:
            if (p := _json_problem(v)) is not None:
                return p
        return None
    if isinstance(value, dict):
        for v in value.values():
            if (p := _json_problem(v)) is not None:
                return p
        return None
    return f"expected a string, number, boolean, array or table, got {value!r}"
