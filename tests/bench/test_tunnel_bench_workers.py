"""``hybridkex bench tunnel --workers 2``: a pair with 2 worker processes on each end measured side by side
with one process per end, on the data path and on the connect load (a new connection per request). Shape only: the
speed goal (>= 1.6x) is the benchmark's to report, met or missed."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from hybridkex.bench.tunnelrun import TunnelBenchOptions
from hybridkex.cli import main


@pytest.mark.timeout(240)
def test_workers_relay_and_connect_load_are_measured_side_by_side(tmp_path: Path) -> None:
    out, md = tmp_path / "w.json", tmp_path / "w.md"
    std = io.StringIO()
    with contextlib.redirect_stdout(std), contextlib.redirect_stderr(std):
        code = main(["bench", "tunnel", "--quick", "--seconds", "0.2", "--no-progress", "--no-stunnel",
                     "--workers", "2", "--loads", "connect", "--json", str(out),
                     "--markdown", str(md)])
    assert code == 0, std.getvalue()
    report = json.loads(out.read_text())
    assert "--workers 2" in report["command"] and report["options"]["workers"] == 2
    relays = {r["id"]: r for r in report["relays"]}
    assert relays["workers2"]["processes"] == 6  # at each end the supervisor and its two workers
    assert relays["hybridkex"]["processes"] == 2
    for relay in ("hybridkex", "workers2"):
        for load in ("connect",):
            r = report["results"][relay][load]
            assert r["errors"] == 0 and r["requests"] > 0, (relay, load, r["error"])
    connect = next(load for load in report["loads"] if load["id"] == "connect")
    assert connect["reconnect"] is True
    ratios = report["vs_one_worker"]
    assert set(ratios) == {"connect"}
    assert all(e["rate_vs_one_worker"] > 0 and e["goal_rate"] == (e["rate_vs_one_worker"] >= 1.6)
               for e in ratios.values())
    assert "Server --workers 2, client --workers 2 against one process per end" in std.getvalue()
    assert "| connect | workers2 |" in md.read_text() and "x, N = 2, 2 (" in md.read_text()


def test_workers_is_a_tunnel_benchmark_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--workers", "2"]) == 2
    assert "--workers: applies to 'bench tunnel' only" in capsys.readouterr().err
    assert main(["bench", "tunnel", "--workers", "0"]) == 2
    assert "--workers: must be >= 1" in capsys.readouterr().err
    assert main(["bench", "tunnel", "--client-workers", "2"]) == 2
    assert "--client-workers: needs --workers N (N >= 2)" in capsys.readouterr().err
    assert main(["bench", "link", "--client-workers", "2"]) == 2
    assert "--client-workers: applies to 'bench tunnel' only" in capsys.readouterr().err


def test_the_workers_relay_is_named_after_both_ends() -> None:
    assert TunnelBenchOptions(workers=2).workers_relay == "workers2"
    assert TunnelBenchOptions(workers=2, client_workers=2).workers_relay == "workers2"
    assert TunnelBenchOptions(workers=3, client_workers=1).workers_relay == "workers3-client1"
