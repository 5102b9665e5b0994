"""``hybridkex bench link``: capacity = key rate / bits per connection, from real simulated blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridkex.cli import main


def test_bench_link_small_run_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "link.json"
    rc = main(["bench", "link", "--distances", "1,60", "--pulses", "1e7", "--rounds", "1",
               "--json", str(out), "--plots", str(tmp_path / "plots")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "handshake capacity" in text and "fresh conn/s" in text
    report = json.loads(out.read_text())
    near, far = report["rows"]
    assert near["distance_km"] == 1.0 and near["blocks_ok"] == 1 and near["net_rate_bps"] > 0
    # 10^7 pulses at 60 km give no key after finite-size costs: reported as zero, not hidden.
    assert far["net_rate_bps"] == 0 and far["fresh_conn_per_s"] == 0
    assert near["net_rate_bps"] < near["finite_rate_bps"] < near["asymptotic_rate_bps"]
    assert near["fresh_conn_per_s"] == pytest.approx(near["net_rate_bps"] / 256)
    assert near["epoch_conn_per_s"] == pytest.approx(near["net_rate_bps"] * 1000 / 256)
    assert (tmp_path / "plots" / "link-capacity.png").stat().st_size > 1000


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "link", "--distances", "x"], "--distances"),
    (["bench", "link", "--pulses", "10"], "--pulses"),
    (["bench", "--distances", "5"], "applies to 'bench link' only"),
    (["bench", "link", "--clients", "3"], "does not apply to 'bench link'"),
])
def test_bench_link_bad_options_are_one_line_errors(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
