"""The tunnel's command line: exit statuses documented where users look, usage errors at the right level."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hybridkex import exceptions
from hybridkex.commands.exitcodes import EXIT_STATUSES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tunnel.md"
_ROW = re.compile(r"^\| (\d+) \| (.+) \|$")


def _documented() -> list[tuple[int, str]]:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Exit status", 1)[1].split("\n## ", 1)[0]
    return [(int(m.group(1)), m.group(2)) for line in section.splitlines() if (m := _ROW.match(line))]


def _help(*argv: str) -> str:
    return subprocess.run([sys.executable, "-m", "hybridkex", *argv, "--help"], capture_output=True, text=True,
                          timeout=60, check=True).stdout


def test_docs_exit_status_table_is_the_code_table() -> None:
    assert _documented() == list(EXIT_STATUSES)


def test_every_exception_exit_code_is_documented() -> None:
    documented = {code for code, _ in EXIT_STATUSES}
    classes = [getattr(exceptions, name) for name in exceptions.__all__]
    codes = {cls.exit_code for cls in classes if issubclass(cls, exceptions.HybridKEXError)}
    assert codes <= documented, sorted(codes - documented)
    assert 7 in codes and "KME is down at startup" in dict(EXIT_STATUSES)[7]


@pytest.mark.parametrize("argv", [(), ("tunnel", "server"), ("tunnel", "client")])
def test_help_lists_every_exit_status(argv: tuple[str, ...]) -> None:
    text = _help(*argv)
    assert "exit status:" in text
    for code, meaning in EXIT_STATUSES:
        assert re.search(rf"^ +{code} +{re.escape(meaning)}$", text, re.MULTILINE), (code, text)


@pytest.mark.parametrize("role", ["server", "client"])
def test_unknown_option_prints_the_subcommand_usage(role: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "tunnel", role, "--foo"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"usage: hybridkex tunnel {role} [-h] [--config FILE]"), lines
    assert lines[-1] == f"hybridkex tunnel {role}: error: unrecognized arguments: --foo"
