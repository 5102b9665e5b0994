"""The command line, run as a user runs it: a real process, its output and exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import hybridkex


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridkex", *args], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"hybridkex {hybridkex.__version__}"


def test_help_lists_every_command() -> None:
    from hybridkex.cli import COMMANDS

    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout
    assert "hybridkex demo" in proc.stdout


def test_no_command_prints_help_and_fails() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert "usage:" in proc.stdout


def test_vectors_prints_the_vector_file() -> None:
    proc = run_cli("vectors")
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    with open(os.path.join(os.path.dirname(__file__), "vectors", "hybridkex-v1.json"), encoding="utf-8") as f:
        assert doc == json.load(f)


def test_suites_json() -> None:
    proc = run_cli("suites", "--json")
    assert proc.returncode == 0
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["x25519-mlkem768-qkd-hkdfsha256"]["default"] is True
    assert rows["x25519-mlkem768-qkd-hkdfsha256"]["available"] is True


def test_user_error_is_one_line_without_traceback() -> None:
    proc = run_cli("demo", "--suite", "x25519-rsa")
    assert proc.returncode == 2  # ConfigurationError
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hybridkex: error: suite: unknown suite 'x25519-rsa'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [("--bogus",), ("demo", "--nope")])
def test_bad_arguments_exit_2(args: tuple[str, ...]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_main_maps_internal_errors_to_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hybridkex import cli
    from hybridkex.commands import suites

    def boom(args: object) -> int:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(suites, "run", boom)
    monkeypatch.delenv("HYBRIDKEX_DEBUG", raising=False)
    assert cli.main(["suites"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "this is a bug" in err
