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
from concurrent.futures import ThreadPoolExecutor
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


def _run_atheris(name: str, work: Path) -> tuple[str, int, str]:
    corpus = work / name
    corpus.mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz.py"), name, str(corpus), f"-max_total_time={ATHERIS_SECONDS}",
         "-timeout=20", "-rss_limit_mb=2048", "-max_len=8192", f"-artifact_prefix={work}/{name}-",
         "-print_final_stats=1"],
        capture_output=True, text=True, timeout=ATHERIS_SECONDS + 120, cwd=work, check=False,
    )
    runs = re.search(r"Done (\d+) runs", proc.stderr)
    return name, proc.returncode if runs or proc.returncode else -1, proc.stderr if not runs else runs.group(1)


@pytest.mark.skipif(not _atheris_available(), reason="atheris is not installed (no wheel for this platform)")
def test_atheris_bounded_pass(tmp_path: Path) -> None:
    """Every target under libFuzzer's coverage guidance for a few seconds: no crash file, exit 0."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda n: _run_atheris(n, tmp_path), sorted(fuzz_targets.TARGETS)))
    failures = {name: out[-3000:] for name, rc, out in results if rc != 0}
    assert not failures, failures
    crashes = sorted(p.name for p in tmp_path.glob("*-crash-*"))
    assert not crashes, crashes
    counts = {name: int(out) for name, _, out in results}
    assert all(n > 0 for n in counts.values()), counts
    print("atheris runs per target:", counts)
