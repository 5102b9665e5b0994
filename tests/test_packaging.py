"""The installed distribution matches the source: version, entry point, typing marker, data."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import hybridkex

ROOT = Path(__file__).resolve().parent.parent


def test_version_from_metadata_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert hybridkex.__version__ == metadata.version("hybridkex") == project["version"]


def test_console_script_declared() -> None:
    eps = metadata.entry_points(group="console_scripts")
    assert any(ep.name == "hybridkex" and ep.value == "hybridkex.cli:main" for ep in eps)


def test_typed_marker_present() -> None:
    assert (Path(hybridkex.__file__).parent / "py.typed").is_file()
