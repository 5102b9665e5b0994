"""Fuzzing of every decoder, bounded for CI: hypothesis byte fuzzing of the fuzz/ targets, plus a
short coverage-guided atheris pass of each target in a subprocess (fuzz/README.md has the long run).

The contract checked for every input: the target returns, or the code raises a HybridKEXError
(which the target swallows).  Anything else escaping (IndexError, KeyError, struct.error,
UnicodeError, TypeError, AssertionError, RecursionError, a FuzzFinding from a property check) fails
the test with the input that caused it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hardeninghelpers import ROOT, fuzz_inputs, fuzz_targets
from hypothesis import HealthCheck, given, settings

#: Examples per target in the default run (the atheris pass below adds far more, coverage-guided).
BUDGET = {
    "wire": 1500,
    "responder": 400,
    "initiator": 400,
    "tunnel_config": 300,
    "kme_json": 600,
    "tls_sniff": 600,
}
#: Seconds of coverage-guided fuzzing per target in the default run (two targets at a time).
ATHERIS_SECONDS = int(os.environ.get("HYBRIDKEX_FUZZ_SECONDS", "2"))


def test_every_target_has_a_budget_and_seeds() -> None:
    assert set(BUDGET) == set(fuzz_targets.TARGETS)
    for name in fuzz_targets.TARGETS:
        assert fuzz_targets.seeds(name), name


@pytest.mark.parametrize("name", sorted(fuzz_targets.TARGETS))
def test_seeds_pass_and_reach_deep(name: str) -> None:
    """The seeds themselves run clean; the honest handshake seeds really complete (so mutations of
    them exercise every state, up to key confirmation)."""
    for seed in fuzz_targets.seeds(name):
        fuzz_targets.TARGETS[name](seed)
    if name == "initiator":
        for profile in range(len(fuzz_targets._PROFILES)):
            _, res_stream = fuzz_targets.honest_flights(profile)
            assert res_stream.startswith(b"HK\x01\x02")


def _hypothesis_test(name: str):  # type: ignore[no-untyped-def]
    @settings(max_examples=BUDGET[name], deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(data=fuzz_inputs(name))
    def run(data: bytes) -> None:
        fuzz_targets.TARGETS[name](data)

    return run


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_hypothesis_byte_fuzzing(name: str) -> None:
    _hypothesis_test(name)()


def test_a_non_utf8_tunnel_config_is_a_configuration_error(tmp_path: Path) -> None:
    """Found by the tunnel_config target: tomllib decodes the file before parsing, and its
    UnicodeDecodeError escaped load_config() (the CLI would have shown a traceback)."""
    from hybridkex.exceptions import ConfigurationError
    from hybridkex.tunnel.config import load_config

    path = tmp_path / "server.toml"
    path.write_bytes(b'identity = "\xff\xfe"\n')
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        load_config("server", path)


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


#: One process imports fuzz/fuzz.py (atheris instruments hybridkex then: seconds of CPU), then forks
#: a child per target, two at a time, that runs fuzz.py's own main() with the target's argv, its
#: stderr in WORK/NAME.log; prints each target's exit status.  A fresh process per target would
#: repeat the instrumented import six times.
_FORKING_DRIVER = """
import os, sys
sys.argv[0] = FUZZ
sys.path.insert(0, os.path.dirname(FUZZ))
import fuzz
running = {}
for name in NAMES:
    while len(running) >= 2:
        pid, status = os.wait()
        print(running.pop(pid), os.waitstatus_to_exitcode(status), flush=True)
    os.mkdir(os.path.join(WORK, name))
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            fd = os.open(os.path.join(WORK, name + ".log"), os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(fd, 2)
            prefix = "-artifact_prefix=" + os.path.join(WORK, name + "-")
            sys.argv = [FUZZ, name, os.path.join(WORK, name), *FLAGS, prefix]
            fuzz.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    running[pid] = name
while running:
    pid, status = os.wait()
    print(running.pop(pid), os.waitstatus_to_exitcode(status), flush=True)
"""


def _run_atheris(names: list[str], work: Path) -> list[tuple[str, int, str]]:
    """(name, exit status, the run count or, when libFuzzer did not say it was done, its output)."""
    flags = [f"-max_total_time={ATHERIS_SECONDS}", "-timeout=20", "-rss_limit_mb=2048", "-max_len=8192",
             "-print_final_stats=1"]
    setup = f"FUZZ, WORK, NAMES, FLAGS = {str(ROOT / 'fuzz' / 'fuzz.py')!r}, {str(work)!r}, {names!r}, {flags!r}\n"
    proc = subprocess.run([sys.executable, "-c", setup + _FORKING_DRIVER], capture_output=True, text=True,
                          timeout=len(names) * ATHERIS_SECONDS + 180, cwd=work, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = dict(line.split() for line in proc.stdout.splitlines())
    assert sorted(codes) == sorted(names), proc.stdout
    results = []
    for name in names:
        log = (work / f"{name}.log").read_text(errors="replace")
        runs = re.search(r"Done (\d+) runs", log)
        code = int(codes[name])
        results.append((name, code if runs or code else -1, log if not runs else runs.group(1)))
    return results


@pytest.mark.skipif(not _atheris_available(), reason="atheris is not installed (no wheel for this platform)")
def test_atheris_bounded_pass(tmp_path: Path) -> None:
    """Every target under libFuzzer's coverage guidance for a few seconds: no crash file, exit 0."""
    results = _run_atheris(sorted(fuzz_targets.TARGETS), tmp_path)
    failures = {name: out[-3000:] for name, rc, out in results if rc != 0}
    assert not failures, failures
    crashes = sorted(p.name for p in tmp_path.glob("*-crash-*"))
    assert not crashes, crashes
    counts = {name: int(out) for name, _, out in results}
    assert all(n > 0 for n in counts.values()), counts
    print("atheris runs per target:", counts)
