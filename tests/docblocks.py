"""The fenced code blocks of README.md and docs/*.md, and how a test runs each kind.

Every block is either *exercised* by tests/test_docs.py or *marked as an excerpt* by an HTML
comment on the line right before its opening fence (invisible on GitHub)::

    <!-- excerpt: why it is not run (a fragment, notation, output with made-up values, ...) -->

Exercised, by the block's language:

* ``python``: run as a script in a fresh process (the document's working directory, a timeout).
* ``toml``: a tunnel configuration; its first line names it (``# server.toml`` / ``# client.toml``,
  which also gives the role). It goes through ``hybridkex tunnel ROLE --check-config`` with the
  files it names created by the test, and is written into the document's working directory for
  the commands that follow.
* ``sh``: every command line runs in the document's working directory.
* ``console``: ``$ `` lines are commands, run the same way; the lines after one are its expected
  output: each must match a line of the real output, in order (numbers, UUIDs and ``…`` vary).

Commands that would run until stopped are run so they end: ``hybridkex tunnel server|client`` gets
``--check-config``; ``hybridkex kme`` is started, must print its two ``KME-A``/``KME-B`` lines, and is
stopped.  Any other kind of block must be marked, so a new block nobody runs fails the inventory.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = ("python", "toml", "sh", "console")
MARKER = re.compile(r"^\s*<!--\s*excerpt\s*(?::\s*(?P<why>.*?))?\s*-->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
TOML_NAME = re.compile(r"^#\s*(?P<name>[\w.-]*(?P<role>server|client)[\w.-]*\.toml)\b")
TIMEOUT = 60.0


class DocError(AssertionError):
    """A block failed, or a document cannot be parsed; the message names file and line."""


@dataclass(frozen=True)
class Block:
    doc: str          # path relative to the repository root
    line: int         # 1-based line of the opening fence
    lang: str         # first word of the info string ("" for a bare fence)
    text: str
    excerpt: str | None  # the marker's reason, "" for a marker without one, None when unmarked

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def parse(text: str, doc: str) -> list[Block]:
    """Fenced blocks (CommonMark: ``` or ~~~, closed by the same character at least as long)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or (m.group("fence")[0] == "`" and "`" in m.group("info")):
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        info = m.group("info").strip()
        previous = lines[i - 1] if i else ""
        marker = MARKER.match(previous)
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if close and close.group("fence")[0] == fence[0] and len(close.group("fence")) >= len(fence) \
                    and not close.group("info").strip():
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        else:
            raise DocError(f"{doc}:{i + 1}: code block never closed")
        blocks.append(Block(doc, i + 1, info.split()[0] if info else "", "\n".join(body) + "\n",
                            (marker.group("why") or "") if marker else None))
        i = j + 1
    return blocks


def orphan_markers(text: str, doc: str) -> list[str]:
    """Excerpt markers that are not on the line right before an opening fence (they mark nothing)."""
    lines = text.splitlines()
    return [f"{doc}:{n + 1}: an excerpt marker must be on the line right before the block's opening fence"
            for n, line in enumerate(lines)
            if MARKER.match(line) and not (n + 1 < len(lines) and _FENCE.match(lines[n + 1]))]


def all_blocks(root: Path = ROOT) -> list[Block]:
    return [b for path in documents(root) for b in parse(path.read_text(encoding="utf-8"),
                                                          path.relative_to(root).as_posix())]


def inventory_problems(blocks: list[Block]) -> list[str]:
    """Why each block is neither exercised nor properly marked (empty: all is well)."""
    problems = []
    for b in blocks:
        if b.excerpt is not None:
            if not b.excerpt:
                problems.append(f"{b.where}: say why it is an excerpt: <!-- excerpt: REASON -->")
        elif b.lang not in RUNNABLE:
            problems.append(f"{b.where}: a ```{b.lang or '(no language)'} block nobody runs: make it a runnable "
                            f"{'/'.join(RUNNABLE)} block or put <!-- excerpt: REASON --> on the line before it")
        elif b.lang == "toml" and not TOML_NAME.match(b.text):
            problems.append(f"{b.where}: a TOML block starts with '# server.toml' or '# client.toml' (its file "
                            "name and tunnel role), or is marked as an excerpt")
    return problems


# -- running ------------------------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    """This interpreter's environment first on PATH (``hybridkex``, ``python``), no test hooks."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL", "HYBRIDKEX_TESTING")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def commands(block: Block) -> Iterator[tuple[str, list[str]]]:
    """(command, expected output lines) of an sh or console block; backslash continuations joined."""
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if block.lang == "console":
            if not line.startswith("$ "):
                if line.strip():
                    raise DocError(f"{block.where}: output line before any '$ ' command: {line!r}")
                continue
            line = line[2:]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        expected = []
        while block.lang == "console" and i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        yield line, expected


def run_command(command: str, cwd: Path, where: str) -> str:
    """Run one documented command line; returns its stdout + stderr. Raises DocError on failure."""
    argv = shlex.split(command, comments=True)
    if argv[:2] == ["hybridkex", "kme"]:
        return _run_until_ready(argv, cwd, where)
    if argv[:2] == ["hybridkex", "tunnel"] and "--check-config" not in argv:
        argv.append("--check-config")  # the tunnel would run until stopped: validate what it would run
        proc = subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT,
                              check=False)
    else:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=clean_env(),
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if proc.returncode != 0:
        raise DocError(f"{where}: `{command}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def _run_until_ready(argv: list[str], cwd: Path, where: str) -> str:
    """Start ``hybridkex kme``, wait for its KME-A and KME-B lines, stop it (SIGTERM) and return them."""
    proc = subprocess.Popen(argv, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        assert proc.stdout is not None
        while len(out) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()  # the KME prints and flushes both lines once it serves
            if not line:
                break
            out.append(line.rstrip("\n"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if [line.split()[0] for line in out] != ["KME-A", "KME-B"]:
        raise DocError(f"{where}: `{shlex.join(argv)}` did not start (printed {out!r}):\n{err}")
    return "\n".join(out) + "\n"


_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def line_pattern(expected: str) -> re.Pattern[str]:
    """An expected output line as a pattern: numbers, UUIDs and runs of spaces vary; '…' is anything."""
    parts = []
    for piece in re.split(f"({_UUID}|…)", expected.strip()):
        if piece == "…":
            parts.append(".*")
        elif re.fullmatch(_UUID, piece):
            parts.append(_UUID)
        else:
            literal = re.sub(r"\\ (\\ )*", r"\\s+", re.escape(piece))
            parts.append(re.sub(r"\d+", r"\\d+", literal))
    return re.compile("".join(parts))


def check_output(expected: list[str], actual: str, where: str, command: str) -> None:
    """Each expected line ('…' alone skips) matches an actual line, in order."""
    lines = [line.strip() for line in actual.splitlines()]
    at = 0
    for want in expected:
        if want.strip() in ("", "…", "..."):
            continue
        pattern = line_pattern(want)
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        if at == len(lines):
            raise DocError(f"{where}: `{command}` did not print a line like {want.strip()!r} (in this order); "
                           f"it printed:\n{actual}")
        at += 1
