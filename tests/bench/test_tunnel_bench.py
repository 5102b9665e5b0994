"""``hybridkex bench tunnel --quick`` runs real tunnel processes end to end; its output is checked for
shape and for bytes having really moved (no timing assertions: speed goals live in the benchmark)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from hybridkex.bench.tunnelprocs import stunnel_binary
from hybridkex.cli import main
from hybridkex.tunnel.ktls import ktls_status


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench-tunnel")
    json_path, md = out / "t.json", out / "t.md"
    std, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(std), contextlib.redirect_stderr(err):
        code = main(["bench", "tunnel", "--quick", "--seconds", "0.2", "--json", str(json_path),
                     "--markdown", str(md), "--plots", str(out / "plots")])
    report = json.loads(json_path.read_text()) if json_path.exists() else {}
    report["_stdout"], report["_stderr"], report["_plots"] = std.getvalue(), err.getvalue(), str(out / "plots")
    return code, std.getvalue() + err.getvalue(), report, md.read_text() if md.exists() else ""


@pytest.mark.timeout(240)
def test_every_relay_moved_every_load_and_reports_its_numbers(run: tuple[int, str, dict[str, Any], str]) -> None:
    code, output, report, markdown = run
    assert code == 0, output
    assert report["schema"] == "hybridkex-bench-tunnel/1"
    assert report["command"].startswith("hybridkex bench tunnel --quick")
    relays = [r["id"] for r in report["relays"]]
    assert relays[0] == "direct" and "hybridkex" in relays
    assert ("stunnel" in relays) == (stunnel_binary() is not None)
    if stunnel_binary() is None:
        assert any("stunnel is not installed" in n for n in report["notes"])
    else:
        assert "TLSv1.3" in (report["versions"]["stunnel_tls"] or "")
    assert [load["id"] for load in report["loads"]] == ["small", "pipelined", "bulk"]
    for relay in relays:
        for load in report["loads"]:
            r = report["results"][relay][load["id"]]
            assert r["errors"] == 0, (relay, load["id"], r["error"])
            # Every request is answered in full before it counts, so requests > 0 means bytes went through.
            assert r["requests"] >= load["connections"] * load["pipeline"], (relay, load["id"])
            assert _number(r["rate_median"]) and r["rate_median"] > 0
            assert r["latency_ms_p50"] <= r["latency_ms_p95"] <= r["latency_ms_p99"]
            if relay == "direct":
                assert r["cpu_ms_per_mb_median"] is None
            else:
                assert _number(r["cpu_ms_per_mb_median"]) and r["cpu_ms_per_mb_median"] > 0
    assert set(report["vs_stunnel"]) == {"small", "pipelined", "bulk"}
    for table_line in ("| load | relay | req/s |", "| bulk | hybridkex |"):
        assert table_line in markdown
    assert "Goals against stunnel" in output or stunnel_binary() is None


def test_progress_goes_to_stderr_and_the_method_is_stated(run: tuple[int, str, dict[str, Any], str]) -> None:
    code, _, report, markdown = run
    assert code == 0
    # Not a terminal: one line per phase, ending with the total; nothing of it on stdout.
    err = report["_stderr"].splitlines()
    assert err[0].startswith("[bench   0%] starting the service"), err[:2]
    assert "[bench " in err[1] and "round 1/1" in err[1]
    assert err[-1].startswith("[bench 100%] done in ")
    assert "[bench" not in report["_stdout"]
    assert set(report["method"]) >= {"warm-up", "rate", "latency", "cpu", "rounds", "ktls"}
    ktls = report["machine"]["ktls"]
    assert ktls["summary"] == ktls_status().summary and ktls["used"] is False, ktls
    assert f"kTLS:     {ktls['summary']}" in report["_stdout"] and f"- kTLS:     {ktls['summary']}" in markdown
    assert "1 rounds of 0.2 s" in report["method"]["rounds"]
    assert "Method:" in report["_stdout"] and "- warm-up: " in markdown


def test_plots_are_png_files_of_rate_and_latency(run: tuple[int, str, dict[str, Any], str]) -> None:
    code, _, report, _ = run
    assert code == 0
    plots = Path(report["_plots"])
    assert sorted(p.name for p in plots.iterdir()) == ["tunnel-latency.png", "tunnel-rate.png"]
    for p in plots.iterdir():
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, p
        assert f"plot: {p}" in report["_stdout"]
    assert "--plots" in report["command"]


def test_handshake_only_options_are_refused_for_the_tunnel_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "tunnel", "--variants", "tls-psk"]) != 0
    assert "handshake benchmark" in capsys.readouterr().err
    assert main(["bench", "tunnel", "--loads", "small,nonsense"]) != 0
    assert "unknown load 'nonsense'" in capsys.readouterr().err


def test_a_missing_port_file_directory_makes_the_service_fail_clearly(tmp_path: Path) -> None:
    from hybridkex.bench.tunnelprocs import Procs
    from hybridkex.exceptions import ConfigurationError

    procs = Procs(tmp_path)
    (tmp_path / "service.port").mkdir()  # the service cannot write its port: it must exit, not hang
    try:
        with pytest.raises(ConfigurationError, match="service did not start"):
            procs.service()
    finally:
        procs.close()
