"""Validation helpers of the tunnel configuration: one TOML table, its schema and typed getters.

Every getter names the field in its error (``limits.max_connections: expected an integer, got
number 1.5``); a key outside the table's schema is refused when the table is opened, with the
closest known key as a hint, before any value is read.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

from ..exceptions import ConfigurationError

__all__ = ["MISSING", "SCHEMA", "Table", "describe"]

MISSING: Final = object()
_TYPE_NAMES: Final = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
                      list: "an array", dict: "a table"}


def describe(value: object) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
    if isinstance(value, (list, dict)):
        return kind
    return f"{kind} {value!r}"


#: The keys each table may hold; anything else is a typo, reported before any value is read, so a
#: misspelt required key is named as the typo it is, not as a missing key.
SCHEMA: Final[Mapping[str, tuple[str, ...]]] = {
    "": ("listen", "target", "identity", "workers", "peers", "target_identity", "kme", "policy", "timeouts", "limits",
         "logging", "metrics", "health", "recycle", "state"),
    "peers": ("identity", "mode", "sae_id", "psk_file", "cert", "key", "ca", "bootstrap"),
    "recycle": ("store", "policy"),
    "state": ("url", "key_file", "purge_every", "spent_older_than", "read_rate", "read_burst", "read_address_rate",
              "read_address_burst", "unknown_ttl", "unknown_max"),
    "kme": ("embedded", "url", "sae_id", "cert", "key", "ca", "retries", "backoff", "max_backoff"),
    "policy": ("qkd", "suites", "key_budget", "steady"),
    "timeouts": ("handshake", "idle", "drain", "connect"),
    "limits": ("max_connections", "handshake_rate", "handshake_burst", "address_rate", "address_burst"),
    "logging": ("format", "level"),
    "metrics": ("enabled", "listen"),
    "health": ("enabled",),
}


def _unknown_key(name: str, key: str, known: Sequence[str], prefix: str) -> ConfigurationError:
    # A shortened key ("psk" for "psk_file") is as likely a slip as a misspelt one.
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6) or [k for k in known if k.startswith(key)][:1]
    hint = f"did you mean '{prefix}{close[0]}'?" if close else "known keys here: " + ", ".join(sorted(known))
    exc = ConfigurationError(f"unknown key '{name}' ({hint})")
    exc.field = name  # for _attribute; the message names the key already
    return exc


class Table:
    """A TOML table being validated: typed getters that name the field; unknown keys are refused up front."""

    def __init__(self, data: object, path: str, schema: str) -> None:
        if not isinstance(data, dict):
            raise ConfigurationError(f"expected a table, got {describe(data)}", field=path or None)
        self.data: dict[str, Any] = data
        self.path = path
        self.keys = SCHEMA[schema]
        for key in data:
            if key not in self.keys:
                raise _unknown_key(self.name(key), key, self.keys, f"{path}." if path else "")

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _known(self, key: str) -> None:
        if key not in self.keys:  # a schema bug, not a user error
            raise KeyError(f"{key!r} is not in the schema of table {self.path!r}")

    def has(self, key: str) -> bool:
        self._known(key)
        return key in self.data

    def raw(self, key: str) -> Any:
        self._known(key)
        return self.data.get(key, MISSING)

    def table(self, key: str) -> Table:
        """The sub-table ``key`` (an empty one when absent)."""
        return Table(self.data.get(key, {}) if self.has(key) else {}, self.name(key), key)

    def typed(self, key: str, kind: type, default: Any = MISSING, *, hint: str = "") -> Any:
        value = self.raw(key)
        if value is MISSING:
            if default is MISSING:
                raise ConfigurationError("missing required key" + (f"; {hint}" if hint else ""),
                                         field=self.name(key))
            return default
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigurationError(f"expected {_TYPE_NAMES[kind]}, got {describe(value)}", field=self.name(key))
        return value

    def string(self, key: str, default: Any = MISSING, *, hint: str = "") -> Any:
        value = self.typed(key, str, default, hint=hint)
        if isinstance(value, str) and not value.strip():
            raise ConfigurationError("must not be empty", field=self.name(key))
        return value

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = cast(str, self.typed(key, str, default))
        if value not in choices:
            listed = ", ".join(f'"{c}"' for c in choices)
            raise ConfigurationError(f'expected one of {listed}, got "{value}"', field=self.name(key))
        return value

    def number(self, key: str, default: float, *, minimum: float, maximum: float,
               allow_zero: bool = False) -> float:
        value = cast(float, self.typed(key, float, default))
        if math.isnan(value) or not (minimum <= value <= maximum or (allow_zero and value == 0)):  # NaN too
            lower = "0 or " if allow_zero else ""
            raise ConfigurationError(f"must be {lower}between {minimum:g} and {maximum:g}, got {value:g}",
                                     field=self.name(key))
        return value

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        value = cast(int, self.typed(key, int, default))
        if not minimum <= value <= maximum:
            raise ConfigurationError(f"must be between {minimum} and {maximum}, got {value}", field=self.name(key))
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return cast(bool, self.typed(key, bool, default))

    def forbid(self, key: str, reason: str) -> None:
        self._known(key)
        if key in self.data:
            raise ConfigurationError(f"not allowed {reason}", field=self.name(key))
