"""Shared state: what several server processes or hosts must agree on (docs/fleet.md).

:func:`open_state` picks the backend from a URL: a path or ``sqlite:///PATH`` (the embedded default,
correct across the processes of one host) or ``postgresql://...`` (a fleet of hosts).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..exceptions import ConfigurationError
from .base import SCHEMA_VERSION, WINDOW, Sealer, SharedState, Ticket, load_seal_key, redact_url
from .postgres import PostgresState
from .purger import PurgeHandle, auto_purge
from .sqlite import SQLiteState

__all__ = ["SCHEMA_VERSION", "WINDOW", "PostgresState", "PurgeHandle", "SQLiteState", "Sealer", "SharedState",
           "Ticket", "auto_purge", "load_seal_key", "open_state", "redact_url"]


def open_state(url: str | os.PathLike[str], *, seal_key: bytes | None = None, migrate: bool = False,
               max_keys: int = 8, grace: float = 60.0) -> SQLiteState | PostgresState:
    """The state at ``url``: ``postgresql://...`` (or ``postgres://``), ``sqlite:///PATH``, or a path.

    ``seal_key`` (32 bytes, :func:`load_seal_key`) seals the secrets stored there; ``migrate`` lets
    a PostgreSQL schema of an older version be migrated to this one.
    """
    text = os.fspath(url)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresState(text, seal_key=seal_key, migrate=migrate, max_keys=max_keys, grace=grace)
    if text.startswith("sqlite://"):
        if not text.startswith("sqlite:///"):
            raise ConfigurationError('an SQLite state URL is sqlite:///ABSOLUTE/PATH (three slashes)', field="url")
        text = text[len("sqlite://"):]
    elif "://" in text:
        raise ConfigurationError(f"unknown state backend {text.split('://', 1)[0]!r}; use postgresql://... or "
                                 "a file path (SQLite)", field="url")
    return SQLiteState(Path(text).expanduser(), seal_key=seal_key, max_keys=max_keys, grace=grace)
