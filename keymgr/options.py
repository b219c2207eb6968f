"""One reader for a plug-in's options, with one error wording.

Every plug-in gets its options either as a config table (``[backends.kms]``,
``[publishers.site]``) or as a state URL's query string
(``s3://bucket/state.json?region=eu-west-1``). Both are read through
:class:`Options`, so a bad value reads the same everywhere, one line naming the
field::

    backends.kms.regoin: unknown option (known: alias_prefix, ..., region)
    publishers.site.mode: expected an octal string like '0644', got '888'
    daemon.state?lock_ttl: must be between 5 and 3600, got 1

A table's values arrive typed (TOML); a query's arrive as text and the typed
getters convert them, so ``?lock_ttl=30`` and ``lock_ttl = 30`` are one rule.
Reading is offline: no getter does I/O beyond reading the environment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from keymgr.errors import ConfigError

_TRUE = ("true", "1")
_FALSE = ("false", "0")


class Options:
    """Typed, validated access to one plug-in's options.

    ``where`` names the table (``backends.kms``) or the URL field
    (``daemon.state``); ``sep`` joins it to a field name (``.`` for a table,
    ``?`` for a query). Unknown options are refused at construction;
    ``hidden`` ones are accepted but left out of the list shown (options
    refused later with a message of their own, such as a literal token).
    """

    def __init__(
        self,
        values: Mapping[str, Any],
        where: str,
        known: Collection[str],
        *,
        sep: str = ".",
        config_dir: str | None = None,
        hidden: Collection[str] = (),
        text: bool = False,
    ) -> None:
        self.values = values
        self.where = where
        self.sep = sep
        self.config_dir = config_dir
        #: Values are strings to convert (a URL query), not TOML-typed.
        self.text = text
        unknown = sorted(set(values) - set(known) - set(hidden))
        if unknown:
            raise self.err(unknown[0], f"unknown option (known: {', '.join(sorted(known))})")

    @classmethod
    def query(
        cls, query: str, where: str, known: Collection[str], **kwargs: Any
    ) -> Options:
        """The options of a URL's query string; a repeated name is an error."""
        values: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name in values:
                raise ConfigError(f"{where}?{name}: given twice")
            values[name] = value
        return cls(values, where, known, sep="?", text=True, **kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def field(self, name: str) -> str:
        """How errors name the option, e.g. ``backends.kms.region``."""
        return f"{self.where}{self.sep}{name}"

    def err(self, name: str, what: str) -> ConfigError:
        """The one-line error for option ``name``."""
        return ConfigError(f"{self.field(name)}: {what}")

    def raw(self, name: str, default: Any = None) -> Any:
        """The value as given, unchecked (for checks of the plug-in's own)."""
        return self.values.get(name, default)

    def string(
        self, name: str, default: str | None = None, *, env: str | None = None
    ) -> str | None:
        """A non-empty string, stripped; else ``$env`` when set, else ``default``."""
        value = self.values.get(name)
        if value is None:
            if env is not None and (from_env := os.environ.get(env, "").strip()):
                return from_env
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.err(name, f"expected a non-empty string, got {value!r}")
        return value.strip()

    def required(self, name: str, hint: str = "") -> str:
        """A non-empty string that must be given; ``hint`` shows an example."""
        value = self.string(name)
        if value is None:
            raise self.err(name, f"is required{f' ({hint})' if hint else ''}")
        return value

    def path(self, name: str, *, env: str | None = None) -> Path | None:
        """A path; relative to the config file's folder when given in the config."""
        value = self.string(name, env=env)
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute() and self.config_dir is not None and name in self.values:
            p = Path(self.config_dir) / p
        return p

    def number(self, name: str, default: float, low: float, high: float) -> float:
        """A finite number (seconds, usually) in ``[low, high]``."""
        value = self._converted(name, default, float, "a number")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.err(name, f"expected a number, got {value!r}")
        if not math.isfinite(value) or not low <= value <= high:
            raise self.err(name, f"must be between {low:g} and {high:g}, got {value!r}")
        return float(value)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        """An integer in ``[low, high]``."""
        value = self._converted(name, default, int, "an integer")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.err(name, f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise self.err(name, f"must be between {low} and {high}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        """``true`` or ``false`` (in a query also ``1`` or ``0``)."""
        value = self.values.get(name, default)
        if self.text and isinstance(value, str):
            if value.lower() not in _TRUE + _FALSE:
                raise self.err(name, f"expected true or false, got {value!r}")
            return value.lower() in _TRUE
        if not isinstance(value, bool):
            raise self.err(name, f"expected true or false, got {value!r}")
        return value

    def choice(self, name: str, default: str, allowed: Collection[str]) -> str:
        """One of ``allowed``."""
        value = self.values.get(name, default)
        if value not in allowed:
            raise self.err(name, f"expected one of {', '.join(sorted(allowed))}, got {value!r}")
        return str(value)

    def _converted(self, name: str, default: Any, kind: type, what: str) -> Any:
        value = self.values.get(name, default)
        if self.text and isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                raise self.err(name, f"expected {what}, got {value!r}") from None
        return value
