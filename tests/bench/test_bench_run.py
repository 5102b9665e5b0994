"""A tiny benchmark run works end to end and its output is well-formed (no timing assertions)."""

from __future__ import annotations

import math
from typing import Any

from benchhelpers import PNG_MAGIC, REQUIRED_FIELDS, REQUIRED_IDS, TINY_VARIANTS

from hybridkex.bench.variants import VARIANTS


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_the_run_succeeds_and_says_what_it_ran_on(tiny_run: Any) -> None:
    assert tiny_run.exit_code == 0, tiny_run.stderr
    r = tiny_run.report
    assert r["schema"] == "hybridkex-bench/1"
    assert r["command"].startswith("hybridkex bench --quick --variants ")
    for key in ("python", "hybridkex", "cryptography", "pyOpenSSL", "stdlib_openssl"):
        assert r["versions"][key]
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    assert r["machine"]["ktls"]["used"] is False and r["machine"]["ktls"]["summary"]
    assert r["options"]["warmup"] == 1 and r["options"]["rounds"] == 2
    # In display order (baselines first), whatever the order of --variants.
    assert [v["id"] for v in r["variants"]] == [v.id for v in VARIANTS if v.id in TINY_VARIANTS.split(",")]


def test_every_variant_carries_the_required_numbers(tiny_run: Any) -> None:
    rows = {v["id"]: v for v in tiny_run.report["variants"]}
    assert set(REQUIRED_IDS) <= set(rows)
    assert set(TINY_VARIANTS.split(",")) == set(rows)
    for vid, row in rows.items():
        for field in REQUIRED_FIELDS:
            assert field in row, (vid, field)
        assert _number(row["cpu_ms_median"]) and row["cpu_ms_median"] > 0, vid
        assert len(row["cpu_ms_rounds"]) == 2, vid
        assert isinstance(row["bytes_on_wire"], int) and row["bytes_on_wire"] > 0, vid
        assert row["bytes_on_wire"] == row["client_bytes"] + row["server_bytes"]
        if vid == "hybridkex-memory-qkd":  # an in-memory key link cannot reach the worker process
            assert row["latency_ms_median"] is None and row["notes"]
            continue
        assert row["latency_errors"] == 0, (vid, row["notes"])
        assert row["throughput_errors"] == 0 or "epoch" in vid, (vid, row["notes"])
        for field in ("latency_ms_median", "latency_ms_p95", "latency_ms_p99", "proxy_latency_ms_median"):
            assert _number(row[field]) and row[field] > 0, (vid, field)
        assert row["latency_ms_median"] <= row["latency_ms_p95"] <= row["latency_ms_p99"]
        assert row["latency_samples"] == len(row["latency_ms_samples"]) >= 10


def test_round_trips_and_bytes_are_counted_on_the_wire(tiny_run: Any) -> None:
    rows = {v["id"]: v for v in tiny_run.report["variants"]}
    # TLS 1.3 is one round trip; the hybrid handshake in front of it adds one (counted, not assumed).
    for vid in ("stdlib-cert", "pyopenssl-cert-x25519mlkem768", "tls-psk"):
        assert rows[vid]["round_trips"] == 1, vid
    for vid in ("hybridkex", "hybridkex-no-qkd", "hybridkex-kme5ms-pool", "hybridkex-memory-qkd"):
        assert rows[vid]["round_trips"] == 2, vid
    # The hybrid handshake sends an ML-KEM-768 key (1184 B) and ciphertext (1088 B) on top of TLS.
    assert rows["hybridkex"]["bytes_on_wire"] > rows["tls-psk"]["bytes_on_wire"] + 1184 + 1088
    # A reconnect skips the hybrid exchange: TLS alone, one round trip.
    assert rows["hybridkex-reconnect"]["round_trips"] == 1
    assert rows["hybridkex-reconnect"]["bytes_on_wire"] < rows["hybridkex"]["bytes_on_wire"] - 1184 - 1088
    # Over real sockets (counting proxy) the same flights and about the same bytes cross the wire.
    for vid, row in rows.items():
        lw = row["loopback_wire"]
        if lw is None:
            continue
        assert lw["round_trips"] == row["round_trips"], vid
        assert abs(lw["bytes_on_wire"] - row["bytes_on_wire"]) <= 8, vid  # ECDSA signatures vary in length


def test_the_stage_breakdown_finds_every_stage(tiny_run: Any) -> None:
    rows = {v["id"]: v for v in tiny_run.report["variants"]}
    b = rows["hybridkex"]["breakdown_ms"]
    # Each wrapped stage really ran inside the measured handshake (wrapping still matches the code).
    for stage in ("kem", "x25519", "combiner", "auth", "kme", "tls", "other"):
        assert b[stage] > 0, stage
    assert not [n for n in rows["hybridkex"]["notes"] if n.startswith("breakdown")]
    assert rows["hybridkex-no-qkd"]["breakdown_ms"]["kme"] == 0
    reconnect = rows["hybridkex-reconnect"]["breakdown_ms"]
    assert reconnect["tls"] > 0 and reconnect["kem"] == reconnect["kme"] == reconnect["auth"] == 0
    assert set(rows["stdlib-cert"]["breakdown_ms"]) == {"tls"}


def test_goals_are_ratios_from_the_same_run(tiny_run: Any) -> None:
    rows = {v["id"]: v for v in tiny_run.report["variants"]}
    goals = {g["id"]: g for g in tiny_run.report["goals"]}
    cpu = goals["cpu-vs-stdlib-cert"]
    assert math.isclose(cpu["ratio"], rows["hybridkex"]["cpu_ms_median"] / rows["stdlib-cert"]["cpu_ms_median"])
    assert cpu["met"] == (cpu["ratio"] <= 1.0)
    qkd = goals["qkd-pool-overhead-loopback"]
    assert math.isclose(qkd["ratio"], rows["hybridkex-kme5ms-pool"]["latency_ms_median"]
                        / rows["hybridkex-no-qkd"]["latency_ms_median"])
    assert goals["qkd-epoch-overhead-memory"]["ratio"] > 0


def test_terminal_table_and_progress(tiny_run: Any) -> None:
    out = tiny_run.stdout
    assert "hybridkex handshake benchmark (quick mode" in out
    assert "Goals (ratios from this run):" in out and "stage breakdown" in out
    for vid in REQUIRED_IDS:
        assert f"\n{vid} " in out
    assert "JSON: " in out and "plot: " in out
    # Progress goes to stderr (a line per phase when stderr is not a terminal), never to stdout.
    assert "[bench" in tiny_run.stderr and "loopback latency" in tiny_run.stderr
    assert "[bench" not in out


def test_plots_are_png_files(tiny_run: Any) -> None:
    names = sorted(p.name for p in tiny_run.plots.iterdir())
    assert names == ["breakdown.png", "kme-latency.png", "latency.png"]
    for name in names:
        data = (tiny_run.plots / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_each_variant_ran_as_described(tiny_run: Any) -> None:
    """What the measured handshakes established (read from the sessions, not from the config)."""
    est = {v["id"]: v["established"] for v in tiny_run.report["variants"]}
    for vid, facts in est.items():
        assert facts["tls_version"] == "TLSv1.3", vid
    assert est["pyopenssl-cert-x25519mlkem768"]["tls_group"] == "X25519MLKEM768"
    h = est["hybridkex"]
    assert (h["suite"], h["auth_mode"], h["qkd_used"], h["qkd_usage"], h["reconnect"]) == (
        "x25519-mlkem768-qkd-hkdfsha256", "psk", True, "fresh", False)
    assert h["components"] == ["QKD", "X25519", "ML-KEM-768"]
    assert (est["hybridkex-no-qkd"]["qkd_used"], est["hybridkex-no-qkd"]["qkd_usage"]) == (False, "none")
    assert est["hybridkex-epoch-kme5ms"]["qkd_usage"] == "epoch"
    assert est["hybridkex-reconnect"]["reconnect"] is True


def test_markdown_tables(tiny_run: Any) -> None:
    md = tiny_run.markdown
    assert md.startswith("`hybridkex bench --quick")
    assert "| variant | CPU ms | x stdlib |" in md and "| goal | ratio | verdict |" in md
    for vid in REQUIRED_IDS:
        assert f"| {vid} | " in md
    assert "| stdlib-cert | " in md and " | 1.00 | " in md  # the baseline's ratio to itself
