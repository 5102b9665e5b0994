"""``[state]`` in the tunnel configuration: the state shared with other tunnel servers (docs/fleet.md).

``url`` is a PostgreSQL URL (a fleet) or an SQLite path (the processes of one host); ``key_file`` the
host's state key, which seals the recycled keys stored there.  With ``[state]``, the recycled keys of
``mode = "recycled"`` peers live in it (``[recycle] store`` is then not allowed) and a tunnel server
spends its steady-state counters and QKD key IDs there too.  ``purge_every`` and ``spent_older_than``:
the server's own purge of expired rows (``ServerConfig.purge_every``); of a server's worker processes
only worker 1 (the first) purges (``WorkerSetup.adapt``).  ``read_rate`` ... ``unknown_max``: the
bounds on the reads of steady-state parents not in memory (``ServerConfig.state_reads``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..exceptions import ConfigurationError
from ..io.config import ReconnectPolicy, StateReads, SteadyPolicy, check_purge
from ..state import PostgresState, SQLiteState, load_seal_key, open_state, redact_url

if TYPE_CHECKING:
    from ._table import Table
    from .config import _Validator

__all__ = ["StateConfig", "open_config_state", "state_table"]


@dataclass(frozen=True, slots=True)
class StateConfig:
    """``[state]``: where this side's shared state is (the URL's password is never in ``repr``)."""

    url: str
    key_file: Path | None = None
    purge_every: float = 600.0
    spent_older_than: float | None = None
    reads: StateReads = field(default_factory=StateReads)

    def __repr__(self) -> str:
        return (f"StateConfig(url={redact_url(self.url)!r}, key_file={self.key_file!r}, "
                f"purge_every={self.purge_every!r}, spent_older_than={self.spent_older_than!r}, reads={self.reads!r})")

    @property
    def postgresql(self) -> bool:
        return self.url.startswith(("postgresql://", "postgres://"))


def state_table(v: _Validator, top: Table, steady: bool) -> StateConfig | None:
    if not top.has("state"):
        return None
    t = top.table("state")
    url = t.string("url", hint='set url = "postgresql://USER@HOST/DB" (a fleet) or a file path (SQLite, one host)')
    if not url.startswith(("postgresql://", "postgres://")):
        if "://" in url:
            raise ConfigurationError(f"unknown state backend {url.split('://', 1)[0]!r}; use postgresql://... "
                                     "or a file path (SQLite)", field="state.url")
        path = Path(url).expanduser()
        if not path.is_absolute():
            path = v._base_for("state.url") / path
        if path.exists() and not path.is_file():
            raise ConfigurationError(f"not a regular file: {path}", field="state.url")
        url = str(path)
    key_file = v.path(t, "key_file", required=False, sensitive="psk")
    every = t.number("purge_every", 600.0, minimum=0.1, maximum=86400.0, allow_zero=True)
    older = t.number("spent_older_than", 0.0, minimum=1.0, maximum=10 * 7 * 86400.0, allow_zero=True) or None
    # The server's steady policy (the tunnel keeps the default lifetimes; reconnects are off).
    check_purge(every, older, SteadyPolicy(enabled=steady), ReconnectPolicy(), prefix="state.")
    d = StateReads()
    reads = StateReads(
        rate=t.number("read_rate", d.rate, minimum=0.01, maximum=1e6, allow_zero=True),
        burst=t.integer("read_burst", d.burst, minimum=1, maximum=1_000_000),
        address_rate=t.number("read_address_rate", d.address_rate, minimum=0.01, maximum=1e6, allow_zero=True),
        address_burst=t.integer("read_address_burst", d.address_burst, minimum=1, maximum=1_000_000),
        unknown_ttl=t.number("unknown_ttl", d.unknown_ttl, minimum=0.01, maximum=3600.0),
        unknown_max=t.integer("unknown_max", d.unknown_max, minimum=1, maximum=1_000_000))
    return StateConfig(url=url, key_file=key_file, purge_every=every, spent_older_than=older, reads=reads)


def open_config_state(config: StateConfig) -> SQLiteState | PostgresState:
    """The configured state, opened (one line on failure: unreachable, read-only, wrong schema)."""
    seal_key = load_seal_key(config.key_file) if config.key_file is not None else None
    return open_state(config.url, seal_key=seal_key)
