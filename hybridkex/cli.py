"""The ``hybridkex`` command line.

Each subcommand lives in its own module under :mod:`hybridkex.commands` and exposes ``HELP``
(one line), ``configure(parser)`` and ``run(args) -> int``.  Errors reach the user as one line on
stderr (what failed, why, what to do) with a non-zero exit status taken from the exception class;
a traceback is shown only with ``HYBRIDKEX_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Sequence
from types import ModuleType

from . import __version__
from .commands.exitcodes import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, exit_status_epilog
from .exceptions import HybridKEXError

__all__ = ["main"]

#: Subcommands in the order ``--help`` lists them; each names a module in hybridkex.commands.
COMMANDS: tuple[str, ...] = (
    "demo",
    "vectors",
    "suites",
    "tunnel",
    "pki",
    "kme",
    "recycle",
    "state",
    "genpsk",
    "bench",
)



class StrictParser(argparse.ArgumentParser):
    """An argument parser that reports unknown arguments itself.

    argparse leaves a subcommand's unknown arguments to the top-level parser, which then prints
    the top-level usage; a user who typed ``hybridkex tunnel server --foo`` needs the usage of
    ``tunnel server``.  Subparsers are created with the parent's class, so every level is strict.
    """

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"hybridkex.commands.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``only`` (a name from :data:`COMMANDS`) just that command's.

    Building a command's parser imports its module, and some import a lot (the tunnel: aiohttp,
    prometheus_client): ``hybridkex kme`` should not pay for the tunnel's, which made every start of a
    KME (and so every restart a client has to ride out) about a second slower.
    """
    parser = StrictParser(
        prog="hybridkex",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the exit-status table's lines
        description=textwrap.fill(
            "Quantum-safe TLS 1.3 for Python services: ML-KEM + X25519 + QKD keys combined into "
            "an authenticated external PSK, so recorded traffic stays safe from a future quantum computer.", 100),
        epilog="Start with 'hybridkex demo'. Run 'hybridkex COMMAND --help' for a command's options.\n\n"
               + exit_status_epilog(),
    )
    parser.add_argument("--version", action="version", version=f"hybridkex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        module = _load(name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list[0] if args_list and args_list[0] in COMMANDS else None)
    args = parser.parse_args(args_list)
    args.argv = args_list  # e.g. for the tunnel's worker processes
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        result: int = run(args)
        return result
    except HybridKEXError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:
        _error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return 1
    except Exception as exc:
        if os.environ.get("HYBRIDKEX_DEBUG"):
            raise
        _error(
            f"internal error ({type(exc).__name__}: {exc}); this is a bug, please report it "
            "(set HYBRIDKEX_DEBUG=1 for a traceback)"
        )
        return EXIT_INTERNAL


def _error(message: str) -> None:
    print(f"hybridkex: error: {message}", file=sys.stderr)
