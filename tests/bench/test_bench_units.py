"""Units of the benchmark package: counting, statistics, stage attribution, variant selection, CLI."""

from __future__ import annotations

import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridkex.bench.stages import STAGES, StageClock
from hybridkex.bench.stats import quantile, spread, summarize
from hybridkex.bench.variants import VARIANTS, select
from hybridkex.bench.wire import WireLog
from hybridkex.cli import main
from hybridkex.exceptions import ConfigurationError
from hybridkex.hazmat import kem

ROOT = Path(__file__).resolve().parents[2]


def test_wire_log_counts_flights_and_the_round_trips_a_client_waits_for() -> None:
    log = WireLog()
    log.record("c2s", 100)  # ClientHello
    log.record("s2c", 200)  # ServerHello ... Finished
    log.record("s2c", 0)  # nothing moved: not a transfer
    log.client_done()
    log.record("c2s", 50)  # client Finished
    log.record("s2c", 30)  # a session ticket after the handshake
    s = log.summary()
    assert (s.client_bytes, s.server_bytes, s.total, s.flights, s.round_trips) == (150, 230, 380, 4, 1)
    two = WireLog()
    for d in ("c2s", "s2c", "c2s", "c2s", "s2c"):
        two.record(d, 10)  # type: ignore[arg-type]
    two.client_done()
    two.record("c2s", 10)
    assert (two.summary().flights, two.summary().round_trips) == (5, 2)


def test_statistics() -> None:
    data = [float(x) for x in range(100, 0, -1)]  # unsorted on purpose
    # Known values of linear interpolation between closest ranks: position (n - 1) * q, 0-based.
    assert quantile(data, 0.5) == 50.5 == statistics.median(data)
    assert quantile(data, 0.95) == pytest.approx(95.05) and quantile(data, 0.99) == pytest.approx(99.01)
    assert (quantile(data, 0), quantile(data, 1), quantile(data, 0.01)) == (1.0, 100.0, pytest.approx(1.99))
    assert (quantile([1.0, 2.0, 3.0, 4.0], 0.25), quantile([1.0, 2.0, 3.0, 4.0], 0.75)) == (1.75, 3.25)
    assert quantile([3.0], 0.99) == 3.0 == quantile([3.0], 0.01)
    assert math.isnan(quantile([], 0.95))
    with pytest.raises(ValueError, match="whole percentile"):
        quantile(data, 0.999)
    # The same definition as NumPy's default, which draws the plots' boxes: tables and plots agree.
    import numpy as np
    from matplotlib import cbook

    rng = random.Random(18)
    sample = [rng.lognormvariate(0, 1) for _ in range(537)]
    for q in (0.01, 0.25, 0.5, 0.95, 0.99):
        assert quantile(sample, q) == pytest.approx(float(np.percentile(sample, q * 100)), rel=1e-12)
    stats = cbook.boxplot_stats(sample, whis=(1, 99))[0]
    assert (stats["q1"], stats["med"], stats["q3"]) == pytest.approx(
        (quantile(sample, 0.25), quantile(sample, 0.5), quantile(sample, 0.75)), rel=1e-12)
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 4.0, 4)
    assert spread([1.0, 2.0, 3.0]) == 1.0 and spread([5.0]) == 0.0


def test_stage_clock_attributes_to_the_innermost_stage_and_restores_the_code() -> None:
    original = kem.MLKEM.encapsulate
    clock = StageClock()
    with clock.instrument():
        assert kem.MLKEM.encapsulate is not original
        key = kem.get_kem("ML-KEM-768").generate()  # outside begin/end: not attributed
        clock.begin()
        clock.push("tls")
        time.sleep(0.002)
        kem.get_kem("ML-KEM-768").encapsulate(key.public_bytes())
        clock.pop()
        clock.end()
    assert kem.MLKEM.encapsulate is original
    ms = clock.per_handshake_ms()
    assert set(ms) == set(STAGES) and clock.handshakes == 1 and not clock.missing
    assert ms["kem"] > 0 and ms["tls"] >= 2.0 and ms["x25519"] == 0


def test_variant_ids_and_selection() -> None:
    ids = [v.id for v in VARIANTS]
    assert len(ids) == len(set(ids))
    for needed in ("stdlib-cert", "pyopenssl-cert-x25519", "pyopenssl-cert-x25519mlkem768", "tls-psk", "hybridkex",
                   "hybridkex-pki-ed25519", "hybridkex-pki-mldsa65", "hybridkex-pki-hybrid", "hybridkex-no-qkd",
                   "hybridkex-mlkem1024", "hybridkex-epoch", "hybridkex-recycled", "hybridkex-reconnect"):
        assert needed in ids
    for ms in (0, 1, 5, 20):
        assert f"hybridkex-kme{ms}ms-direct" in ids
    assert [v.id for v in select(["pyopenssl-*"])] == ["pyopenssl-cert-x25519", "pyopenssl-cert-x25519mlkem768"]
    with pytest.raises(ConfigurationError, match="no variant matches nope"):
        select(["hybridkex", "nope"])


def test_cli_list_and_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(VARIANTS) and listed[0].startswith("stdlib-cert ")
    assert main(["bench", "--variants", "no-such-variant", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hybridkex: error:") and "no-such-variant" in err[0]
    assert main(["bench", "--rounds", "0"]) != 0
    assert "--rounds" in capsys.readouterr().err


def test_cli_stays_cheap_to_import() -> None:
    code = ("import sys; from hybridkex.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('hybridkex.bench', 'matplotlib'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          check=True)
    assert proc.stdout.strip() == "[]"


def test_the_benchmarks_script_is_the_same_command() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_handshakes.py"), "--list"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("stdlib-cert ")


def test_recycled_and_pki_variants_in_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The authentication variants run, in memory only, and really use their mode (recycled keys
    after the bootstrap handshake of the warm-up)."""
    import json

    out = tmp_path / "auth.json"
    code = main(["bench", "--quick", "--no-loopback", "--no-progress", "--variants",
                 "hybridkex-recycled,hybridkex-pki-ed25519", "--rounds", "1", "--n", "2", "--warmup", "2",
                 "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {r["id"]: r for r in json.loads(out.read_text(encoding="utf-8"))["variants"]}
    assert rows["hybridkex-recycled"]["established"]["auth_mode"] == "recycled"
    assert rows["hybridkex-pki-ed25519"]["established"]["auth_mode"] == "pki-ed25519"
    for row in rows.values():
        assert row["cpu_ms_median"] > 0 and row["latency_ms_median"] is None and row["round_trips"] == 2
        assert row["breakdown_ms"]["auth"] > 0


def test_suites_option_adds_one_variant_per_suite(capsys: pytest.CaptureFixture[str]) -> None:
    chosen = select(["stdlib-cert"], ["x25519-mlkem1024-hkdfsha384", "x25519-hqc1-qkd-hkdfsha256"])
    assert [v.id for v in chosen] == ["stdlib-cert", "hybridkex-suite-x25519-mlkem1024-hkdfsha384",
                                      "hybridkex-suite-x25519-hqc1-qkd-hkdfsha256"]
    assert (chosen[1].suite, chosen[1].qkd) == ("x25519-mlkem1024-hkdfsha384", "none")
    assert (chosen[2].suite, chosen[2].qkd) == ("x25519-hqc1-qkd-hkdfsha256", "pool")
    # Refused before anything starts, in one line: an unknown suite, a retired one.
    for name, why in (("nope", "unknown suite 'nope'"), ("x25519-hqc128-qkd-hkdfsha256", "was removed")):
        assert main(["bench", "--suites", name, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hybridkex: error: --suites: ") and why in err[0], err


def test_a_suite_measured_in_memory_really_runs_that_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With liboqs, a liboqs suite; without it, the ML-KEM-1024 one (the option works either way)."""
    import json

    suite = "x25519-frodokem640aes-qkd-hkdfsha256" if kem.oqs_library_path() else "x25519-mlkem1024-qkd-hkdfsha384"
    out = tmp_path / "suite.json"
    code = main(["bench", "--quick", "--no-loopback", "--no-progress", "--variants", "hybridkex", "--suites", suite,
                 "--rounds", "1", "--n", "2", "--warmup", "1", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {r["id"]: r for r in json.loads(out.read_text(encoding="utf-8"))["variants"]}
    row = rows[f"hybridkex-suite-{suite}"]
    assert row["established"]["suite"] == suite and row["cpu_ms_median"] > 0
    assert row["breakdown_ms"]["kem"] > 0  # the KEM's time is attributed, whichever backend it is from
    assert row["bytes_on_wire"] > rows["hybridkex"]["bytes_on_wire"]  # larger keys than ML-KEM-768's
