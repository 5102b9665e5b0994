"""``hybridkex genpsk FILE``: create a bootstrap pre-shared key file (hex, mode 0600)."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from ..exceptions import ConfigurationError

HELP = "create a random pre-shared authentication key file (32 bytes as hex, readable only by you)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="where to write the key (must not exist)")
    parser.add_argument("--bytes", type=int, default=32, help="key length in bytes (32..1024, default 32)")


def run(args: argparse.Namespace) -> int:
    if not 32 <= args.bytes <= 1024:
        raise ConfigurationError("must be between 32 and 1024", field="--bytes")
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{args.file} exists; refusing to overwrite a key", field="file") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(args.bytes) + "\n")
    print(f"wrote a {args.bytes}-byte key to {args.file} (mode 0600); give the same file to the peer over a "
          "trusted channel")
    return 0
