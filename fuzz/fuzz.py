"""Coverage-guided fuzzing of hybridkex's decoders with atheris (libFuzzer for Python).

Usage (see fuzz/README.md)::

    python fuzz/fuzz.py TARGET [CORPUS_DIR ...] [libFuzzer flags, e.g. -max_total_time=600]

TARGET is one of the names in fuzz_targets.TARGETS.  The seed corpus is written into the first
CORPUS_DIR before fuzzing starts (a temporary directory when none is given).  Any exception other
than a hybridkex.HybridKEXError escaping a target is a crash: libFuzzer stops, prints the
traceback and saves the input as ``crash-<sha1>`` (``-artifact_prefix=DIR/`` chooses where).
``python fuzz/fuzz.py TARGET crash-<sha1>`` replays a saved input.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["hybridkex", "fuzz_targets"]):
    import fuzz_targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in fuzz_targets.TARGETS:
        sys.stderr.write(f"usage: fuzz.py TARGET [CORPUS_DIR ...] [libFuzzer flags]\n"
                         f"targets: {', '.join(fuzz_targets.TARGETS)}\n")
        raise SystemExit(2)
    name = sys.argv[1]
    rest = sys.argv[2:]
    dirs = [a for a in rest if not a.startswith("-") and Path(a).is_dir()]
    if not dirs and not any(not a.startswith("-") for a in rest):
        dirs = [tempfile.mkdtemp(prefix=f"hybridkex-fuzz-{name}-")]
        rest = [dirs[0], *rest]
    if dirs:
        fuzz_targets.write_corpus(name, dirs[0])
    target = fuzz_targets.TARGETS[name]
    atheris.Setup([sys.argv[0], *rest], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
