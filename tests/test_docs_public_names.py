"""Every name the documentation says is public can be imported from the module it names.

The claims are read from the Markdown itself, so a doc edit that names a new class is checked too:

* ``from X import A, B`` lines in code (fenced blocks and inline spans) for modules of hybridkex;
* a paragraph saying names are "importable from `M`" (and "and from `N`"), or "`M` provides:",
  claims the backticked identifiers of the first column of the next table, and (for "names
  below") the backticked identifiers in the headings that follow.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FROM_IMPORT = re.compile(r"from\s+(hybridkex(?:\.[A-Za-z_][\w]*)*)\s+import\s+(\([^)]*\)|[^\n#`]+)")
_SPAN = re.compile(r"`([^`\n]+)`")


def _names(text: str) -> list[str]:
    names = []
    for part in text.strip("() \n").replace("\n", " ").split(","):
        words = part.split()
        if words and words[0] != "*":
            names.append(words[0])  # "A as B" imports A
    return names


def _import_claims(text: str) -> list[tuple[str, str]]:
    claims = []
    for match in _FROM_IMPORT.finditer(text):
        claims += [(match.group(1), name) for name in _names(match.group(2)) if _IDENT.fullmatch(name)]
    return claims


def _first_cells(lines: list[str]) -> list[str]:
    """Backticked identifiers in the first column of the table that starts at ``lines[0]``."""
    found = []
    for line in lines[1:]:  # lines[0] is the header row
        if not line.startswith("|"):
            break
        cell = line.split("|")[1]
        if set(cell.strip()) <= set("-: "):
            continue  # the separator row
        found += [s for s in _SPAN.findall(cell) if _IDENT.fullmatch(s)]
    return found


def _table_claims(text: str) -> list[tuple[str, str]]:
    claims: list[tuple[str, str]] = []
    lines = text.splitlines()
    paragraphs: list[tuple[int, str]] = []  # (index of the line after the paragraph, its text)
    start = 0
    for i, line in enumerate([*lines, ""]):
        if not line.strip():
            if i > start:
                paragraphs.append((i, " ".join(lines[start:i])))
            start = i + 1
    for end, para in paragraphs:
        if "importable from `" in para:
            modules = re.findall(r"(?:importable from|and from) `(hybridkex[\w.]*)`", para)
        elif m := re.match(r"`(hybridkex[\w.]*)` provides", para):
            modules = [m.group(1)]
        else:
            continue
        rest = lines[end:]
        table_at = next((i for i, line in enumerate(rest) if line.startswith("|")), None)
        names = _first_cells(rest[table_at:]) if table_at is not None else []
        if "names below" in para:
            for line in rest:
                if line.startswith("#"):
                    names += [s for s in _SPAN.findall(line) if _IDENT.fullmatch(s)]
        assert names, f"no names found after the claim {para[:60]!r}"
        claims += [(module, name) for module in modules for name in names]
    return claims


def _dotted_heading_claims(text: str) -> list[tuple[str, str]]:
    """``### `hybridkex.connect(...)` `` style headings name a function by its full path."""
    claims = []
    for line in text.splitlines():
        if line.startswith("#"):
            for span in _SPAN.findall(line):
                m = re.match(r"(hybridkex(?:\.[a-z_]\w*)*)\.([A-Za-z_]\w*)\s*(?:\(|$)", span)
                if m:
                    claims.append((m.group(1), m.group(2)))
    return claims


def _claims() -> list[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for module, name in _import_claims(text) + _table_claims(text) + _dotted_heading_claims(text):
            out.add((path.name, module, name))
    return sorted(out)


CLAIMS = _claims()


def test_the_claims_cover_the_documents_that_name_public_api() -> None:
    by_doc = {doc for doc, _, _ in CLAIMS}
    assert {"qkd.md", "api.md"} <= by_doc
    qkd_errors = {name for doc, module, name in CLAIMS if doc == "qkd.md" and module == "hybridkex.qkd"}
    # The error table of docs/qkd.md section 2 is among the claims.
    assert {"KMEConnectionError", "KeyReuseError", "ConfigurationError", "InvalidKeyMaterial"} <= qkd_errors


def test_parser_reads_the_claim_forms() -> None:
    text = ("Errors (importable from `hybridkex.x` and from `hybridkex.y`):\n\n| error | when |\n|---|---|\n"
            "| `A`, `B` | x |\n| | y |\n| `C` | z |\n\nafter\n\n"
            "```python\nfrom hybridkex.z import (D,\n    E as F)\n```\n")
    assert sorted(_table_claims(text)) == sorted(
        [("hybridkex.x", n) for n in "ABC"] + [("hybridkex.y", n) for n in "ABC"])
    assert _import_claims(text) == [("hybridkex.z", "D"), ("hybridkex.z", "E")]


@pytest.mark.parametrize(("doc", "module", "name"), CLAIMS, ids=[f"{d}:{m}.{n}" for d, m, n in CLAIMS])
def test_documented_name_is_importable(doc: str, module: str, name: str) -> None:
    mod = importlib.import_module(module)
    if not hasattr(mod, name):  # a submodule (`hybridkex.tls.stdlib`) counts once imported
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(f"{module}.{name}")
    assert hasattr(mod, name), f"{doc} says {name} is importable from {module}, but it is not"
    if hasattr(mod, "__all__") and not name.startswith("_") and module.startswith("hybridkex.qkd"):
        assert name in mod.__all__, f"{module}.{name} is documented as public but missing from __all__"


def test_qkd_exports_the_error_tree_docs_qkd_md_names() -> None:
    """docs/qkd.md: "Errors (all under `KeySourceError` ...; importable from `hybridkex.qkd`)"."""
    from hybridkex import exceptions as exc
    from hybridkex import qkd

    for name in ("KeyReuseError", "KMEError", "KeySourceError", "KeyUnavailableError", "ConfigurationError",
                 "InvalidKeyMaterial"):
        assert getattr(qkd, name) is getattr(exc, name), name
        assert name in qkd.__all__
    assert issubclass(qkd.KMEKeyNotFoundError, qkd.KeyUnavailableError)
