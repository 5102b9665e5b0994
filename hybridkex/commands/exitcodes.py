"""The CLI's exit statuses: one table that ``--help`` prints and docs/tunnel.md documents.

A :class:`~hybridkex.exceptions.HybridKEXError` ends the CLI with its class's ``exit_code``; the
other statuses are fixed here.  ``tests`` check that every ``exit_code`` of the exception tree is
in :data:`EXIT_STATUSES` and that the documented table is this one.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_STATUSES", "EXIT_USAGE", "exit_status_epilog"]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_INTERNAL: Final = 70
EXIT_INTERRUPTED: Final = 130

#: (status, meaning), in ascending order of status.
EXIT_STATUSES: Final[tuple[tuple[int, str], ...]] = (
    (EXIT_OK, "success (a tunnel also exits 0 after a SIGTERM drain)"),
    (1, "an error without a status of its own, e.g. a file that cannot be read"),
    (EXIT_USAGE, "invalid configuration or command line, or a listen address in use (ConfigurationError)"),
    (3, "an algorithm or backend is missing in this installation (UnsupportedAlgorithm)"),
    (4, "the peer or this side broke the handshake protocol (ProtocolError)"),
    (5, "authentication or key confirmation failed (AuthenticationError, KeyMismatchError)"),
    (6, "the policy was not met (PolicyViolation)"),
    (7, "the QKD key source failed, e.g. the KME is down at startup (KeySourceError)"),
    (8, "the TLS 1.3 handshake or record layer failed (TLSError)"),
    (9, "a deadline passed (HandshakeTimeout)"),
    (10, "the recycled-key store cannot be read or written (StoreError)"),
    (EXIT_INTERNAL, "internal error: a bug, please report it (HYBRIDKEX_DEBUG=1 shows a traceback)"),
    (EXIT_INTERRUPTED, "interrupted (SIGINT) before a tunnel was serving"),
)


def exit_status_epilog() -> str:
    """The table as ``--help`` text (argparse keeps the line breaks with RawDescriptionHelpFormatter)."""
    return "exit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_STATUSES)
