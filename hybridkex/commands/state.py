"""``hybridkex state check|migrate|purge --url URL``: look after a shared state (docs/fleet.md).

``check`` opens the state as a server would (reachable, writable, this schema version) and writes
one probe row; ``migrate`` brings an older PostgreSQL schema to this version (once, after every
server is upgraded); ``purge`` deletes expired tickets and held IDs, and spent IDs older than
``--spent-older-than``, once or ``--every`` SECONDS.  Failures are one line, exit status 10.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from pathlib import Path

from ..exceptions import ConfigurationError
from ..state import PostgresState, SQLiteState, load_seal_key, open_state, redact_url

HELP = "check, migrate or purge a shared state (SQLite file or PostgreSQL database)"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("check", "open the state as a server would and write one probe row"),
                       ("migrate", "bring an older PostgreSQL schema to this version"),
                       ("purge", "delete expired tickets and held IDs (and old spent IDs)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--url", required=True, help="postgresql://USER@HOST/DB, sqlite:///PATH or a file path")
        p.add_argument("--key-file", type=Path, help="the state key (only needed to check that it opens tickets)")
        if name == "purge":
            p.add_argument("--spent-older-than", type=float, metavar="SECONDS",
                           help="also delete spent IDs recorded more than SECONDS ago (longer than any "
                                "ticket's or key's lifetime, so a replay cannot outlive its record)")
            p.add_argument("--every", type=float, metavar="SECONDS", help="purge every SECONDS until interrupted")


def _open(args: argparse.Namespace, *, migrate: bool = False) -> SQLiteState | PostgresState:
    url = str(args.url)
    if "://" not in url or url.startswith("sqlite:///"):
        path = Path(url[len("sqlite://"):] if url.startswith("sqlite://") else url).expanduser()
        if not path.is_file():  # check, migrate and purge never create a state
            raise ConfigurationError(f"no state file at {path}; a server creates it on first start", field="url")
    key = load_seal_key(args.key_file) if args.key_file is not None else None
    return open_state(url, seal_key=key, migrate=migrate)


def run(args: argparse.Namespace) -> int:
    where = redact_url(str(args.url))
    if args.action == "migrate":
        with _open(args, migrate=True) as state:
            print(f"{state.backend} state {where}: schema version {state.schema_version()}")
        return 0
    if args.action == "check":
        with _open(args) as state:
            probe = secrets.token_hex(8)
            state.spend("hybridkex:check", [f"{os.getpid()}-{probe}"])  # writable: a real write
            note = ""
            if args.key_file is not None:
                state.put_ticket("check", probe.encode(), b"probe", expires_at=time.time() + 60)
                ticket = state.take_ticket("check", probe.encode())
                note = ", the state key opens its tickets" if ticket is not None and ticket.secret == b"probe" else ""
            print(f"ok: {state.backend} state {where}, schema version {state.schema_version()}, writable{note}")
        return 0
    every = args.every
    if every is not None and not 1 <= every <= 86400:
        raise ConfigurationError("must be 1..86400 seconds", field="--every")
    older = args.spent_older_than
    if older is not None and older < 0:
        raise ConfigurationError("must be >= 0 seconds", field="--spent-older-than")
    with _open(args) as state:
        while True:
            n = state.purge(spent_before=None if older is None else time.time() - older)
            print(f"purged {n} expired rows from {state.backend} state {where}", flush=True)
            if every is None:
                return 0
            time.sleep(every)
