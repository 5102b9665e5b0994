"""Fixtures for the benchmark tests: one tiny benchmark run shared by the tests of its output."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from benchhelpers import TINY_ARGS


@dataclass
class TinyRun:
    exit_code: int
    stdout: str
    stderr: str
    report: dict[str, Any]
    plots: Path
    markdown: str


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """``hybridkex bench`` run once (in this process, as the CLI runs it) with tiny sizes."""
    from hybridkex.cli import main

    out = tmp_path_factory.mktemp("bench")
    json_path, plots, md = out / "bench.json", out / "plots", out / "bench.md"
    # capsys is function-scoped; this fixture is shared by the module, so redirect by hand.
    std, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(std), contextlib.redirect_stderr(err):
        code = main(["bench", *TINY_ARGS, "--json", str(json_path), "--plots", str(plots), "--markdown", str(md)])
    report = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else {}
    markdown = md.read_text(encoding="utf-8") if md.exists() else ""
    return TinyRun(code, std.getvalue(), err.getvalue(), report, plots, markdown)
