"""Docs as code: every fenced block in README.md and docs/*.md runs in a test or is marked an excerpt.

How blocks are found, marked and run: tests/docblocks.py.  A new block that is neither runnable
nor marked fails test_every_block_is_exercised_or_marked; a runnable one that does not work fails
test_toml_config or test_document.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from docblocks import (
    ROOT,
    TIMEOUT,
    TOML_NAME,
    Block,
    DocError,
    all_blocks,
    check_output,
    clean_env,
    commands,
    documents,
    inventory_problems,
    orphan_markers,
    parse,
    run_command,
)

from hybridkex.cli import main

BLOCKS = all_blocks()
RUN = [b for b in BLOCKS if b.excerpt is None]


def _cli(*argv: str) -> tuple[int, str]:
    """The real CLI entry point in this process (a process each would cost ~1 s of imports)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


# -- the inventory ------------------------------------------------------------------------------------

def test_every_block_is_exercised_or_marked() -> None:
    problems = inventory_problems(BLOCKS)
    for path in documents():
        problems += orphan_markers(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    assert not problems, "\n".join(problems)
    assert len(RUN) >= 10  # the README tour and the tunnel reference really run


def test_the_inventory_catches_an_unmarked_block() -> None:
    doc = "\n".join([
        "# t", "", "<!-- excerpt: notation -->", "```", "a = b", "```", "",       # marked: fine
        "```mermaid", "graph", "```", "",                                          # unmarked, not runnable
        "<!-- excerpt -->", "````text", "```sh", "nested", "```", "````", "",      # marked without a reason
        "<!-- excerpt: too far -->", "", "~~~", "x", "~~~", "",                    # marker not adjacent
        "```toml", 'listen = "x"', "```", "",                                      # TOML without its name
        "```python", "print(1)", "```",                                            # runnable: fine
    ])
    blocks = parse(doc, "t.md")
    assert [(b.line, b.lang, b.excerpt) for b in blocks] == [
        (4, "", "notation"), (8, "mermaid", None), (13, "text", ""), (21, "", None), (25, "toml", None),
        (29, "python", None)]
    assert blocks[2].text == "```sh\nnested\n```\n"  # a longer fence holds shorter ones
    problems = inventory_problems(blocks) + orphan_markers(doc, "t.md")
    assert [p.split(":")[1] for p in problems] == ["8", "13", "21", "25", "19"], problems
    with pytest.raises(DocError, match="never closed"):
        parse("```sh\nls\n", "t.md")


def test_ci_reads_the_readme_test_command() -> None:
    """.ci/run takes the test command from README (after <!-- test-command -->): it must still find it."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    program = re.search(r"test_cmd=\$\(awk '([^']+)' README\.md\)", ci)
    assert program, ".ci/run no longer reads the test command with awk"
    found = subprocess.run(["awk", program.group(1), str(ROOT / "README.md")], capture_output=True, text=True,
                           check=True).stdout.strip()
    first, second = BLOCKS[0], BLOCKS[1]
    assert (first.doc, second.doc) == ("README.md", "README.md")
    assert found == second.text.strip() and "pytest" in found
    assert first.text.strip().endswith("hybridkex demo") and re.search(r'hybridkex"? demo', ci)


# -- TOML: every configuration passes --check-config with the files it names ---------------------------

def _make_named_files(config: Path) -> None:
    """PSK files (hybridkex genpsk) and certificates (hybridkex pki init DIR) the configuration names."""
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    tables = [*data.get("peers", []), data.get("kme", {})]
    pki_dirs = {(config.parent / t[k]).parent for t in tables for k in ("cert", "key", "ca") if k in t}
    for d in sorted(pki_dirs):
        assert _cli("pki", "init", str(d))[0] == 0
    for psk in sorted({config.parent / t["psk_file"] for t in tables if "psk_file" in t}):
        psk.parent.mkdir(parents=True, exist_ok=True)
        if not psk.exists():
            assert _cli("genpsk", str(psk))[0] == 0


@pytest.mark.parametrize("block", [b for b in RUN if b.lang == "toml"], ids=lambda b: b.where)
def test_toml_config(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named = TOML_NAME.match(block.text)
    assert named, block.where
    config = tmp_path / named.group("name")
    config.write_text(block.text, encoding="utf-8")
    _make_named_files(config)
    monkeypatch.chdir(tmp_path)
    code, out = _cli("tunnel", named.group("role"), "--config", str(config), "--check-config")
    assert code == 0 and "configuration OK" in out, f"{block.where}: {out}"


# -- each document's runnable blocks, in order, in one working directory -------------------------------

def _run_python(block: Block, cwd: Path) -> None:
    script = cwd / f"block-{Path(block.doc).stem}-{block.line}.py"
    script.write_text(block.text, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    script.unlink()
    if proc.returncode != 0:
        raise DocError(f"{block.where}: the Python block failed:\n{proc.stdout}{proc.stderr}")


def _run_document(doc: str, cwd: Path) -> int:
    blocks = [b for b in RUN if b.doc == doc]
    # The reader has the files the document shows and is in the repository root (examples/).
    for b in blocks:
        if b.lang == "toml" and (named := TOML_NAME.match(b.text)):
            (cwd / named.group("name")).write_text(b.text, encoding="utf-8")
    (cwd / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    ran = 0
    for b in blocks:
        if b.lang == "python":
            _run_python(b, cwd)
            ran += 1
        elif b.lang in ("sh", "console"):
            for command, expected in commands(b):
                check_output(expected, run_command(command, cwd, b.where), b.where, command)
                ran += 1
    return ran


DOCS_TO_RUN = sorted({b.doc for b in RUN if b.lang in ("python", "sh", "console")})


@pytest.mark.parametrize("doc", DOCS_TO_RUN)
def test_document(doc: str, tmp_path: Path) -> None:
    assert _run_document(doc, tmp_path) > 0


def test_a_broken_block_fails(tmp_path: Path) -> None:
    """The runners fail on what a reader would hit: a failing command, a wrong output, a bad script."""
    with pytest.raises(DocError, match="exited"):
        run_command("hybridkex recycle --store missing.sqlite3 list", tmp_path, "t.md:1")
    with pytest.raises(DocError, match="did not print a line like"):
        check_output(["suite   x25519-mlkem768"], "suite   x25519-mlkem768-qkd\n", "t.md:1", "cmd")
    check_output(["KME-A https://127.0.0.1:40117", "…", "  QKD key IDs  82800578-a379-4694-b584-24dedc21788d"],
                 "KME-A https://127.0.0.1:5\nx\nQKD key IDs    00000000-a379-4694-b584-24dedc21788d\n", "t.md:1", "cmd")
    with pytest.raises(DocError, match="Python block failed"):
        _run_python(Block("t.md", 1, "python", "raise SystemExit('no')\n", None), tmp_path)
    with pytest.raises(DocError, match="exited 2"):  # a config that fails as written (issue 12, item 11)
        (tmp_path / "c.toml").write_text('listen = "127.0.0.1:0"\n')
        run_command("hybridkex tunnel client --config c.toml", tmp_path, "t.md:1")


def test_kme_embedded_help_says_what_the_tunnel_does() -> None:
    """--kme-embedded is refused by the tunnel (tests/tunnel/test_tunnel_secure.py); its help must say so."""
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "tunnel", "client", "--help"], capture_output=True,
                          text=True, timeout=TIMEOUT, check=True, env={**clean_env(), "COLUMNS": "200"})
    flag = re.search(r"--kme-embedded\s+(.*)", proc.stdout)
    assert flag, proc.stdout
    assert "refused" in flag.group(1) and "hybridkex kme" in flag.group(1), flag.group(1)
    assert not flag.group(1).startswith("use "), flag.group(1)
