"""``hybridkex recycle``: inspect and manage a store of recycled authentication keys.

Shows peers, epochs and times, never key material.  ``list`` and ``audit`` open the store
read-only (they never create, write or chmod a file); ``retire-bootstrap`` and ``rebootstrap``
write, creating a new store when the path does not exist (how a pair is enrolled under policy
``rebootstrap``).  Anything that is not a hybridkex store is refused and left untouched.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from ..exceptions import ConfigurationError

HELP = "inspect a recycled-authentication-key store; retire a bootstrap PSK; re-bootstrap a peer"

#: Actions that only read: they open the store read-only.
READ_ONLY_ACTIONS = frozenset({"list", "audit"})


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, type=Path,
                        help="path of the SQLite key store (list and audit only read it; retire-bootstrap "
                             "and rebootstrap create it if it does not exist)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("list", help="peers, key counts, epochs and last rotation (no key material)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (("retire-bootstrap", "stop accepting the bootstrap credential for a peer pair"),
                       ("rebootstrap", "forget a pair's recycled keys and accept its bootstrap credential again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--local", required=True, help="this side's identity")
        p.add_argument("--peer", required=True, help="the peer's identity")
    audit = sub.add_parser("audit", help="rotation history of one pair (epochs and times)")
    audit.add_argument("--local", required=True)
    audit.add_argument("--peer", required=True)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(args: argparse.Namespace) -> int:
    from ..recycle import SQLiteAuthKeyStore  # noqa: PLC0415 - keep `hybridkex --help` light

    read_only = args.action in READ_ONLY_ACTIONS
    if read_only and not args.store.exists():  # never create a store by inspecting a mistyped path
        raise ConfigurationError(f"no key store at {args.store}", field="--store")
    with SQLiteAuthKeyStore(args.store, read_only=read_only) as store:
        if store.created:
            print(f"created a new key store at {args.store} (mode 0600)")
        if args.action == "list":
            rows = store.summaries()
            if args.json:
                print(json.dumps([{
                    "local": r.local_id, "peer": r.peer_id, "keys": r.keys, "newest_epoch": r.newest_epoch,
                    "confirmed_epoch": r.confirmed_epoch, "bootstrap_retired": r.bootstrap_retired,
                    "rotations": r.rotations, "last_rotation": _when(r.last_rotation_at),
                } for r in rows], indent=2))
                return 0
            print(f"{'local':24} {'peer':24} keys epoch confirmed bootstrap  rotations last rotation")
            for r in rows:
                print(f"{r.local_id:24} {r.peer_id:24} {r.keys:4} {r.newest_epoch or 0:5} {r.confirmed_epoch or 0:9} "
                      f"{'retired' if r.bootstrap_retired else 'active':10} {r.rotations:9} "
                      f"{_when(r.last_rotation_at)}")
            return 0
        if args.action == "audit":
            for event, epoch, at in store.audit_log(args.local, args.peer):
                print(f"{_when(at)}  {event:17} epoch {epoch if epoch is not None else '-'}")
            return 0
        if args.action == "retire-bootstrap":
            store.retire_bootstrap(args.local, args.peer)
            print(f"bootstrap credential of {args.local} <-> {args.peer} retired; delete the PSK file when both "
                  "sides have retired it")
            return 0
        store.rebootstrap(args.local, args.peer)
        print(f"{args.local} <-> {args.peer}: recycled keys forgotten; the bootstrap credential is accepted again")
        return 0
