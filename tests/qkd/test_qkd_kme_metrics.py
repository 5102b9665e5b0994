"""The KMEs' Prometheus endpoints: scraped over real HTTP, parsed with prometheus_client's parser, and
checked against the ETSI status the same KME gives over mutual TLS; an eavesdropper and a man in the
middle show up in the counters."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qkdlink"))
import test_qkd_kme_conformance as conformance
from linkhelpers import fast_settings

from hybridkex.cli import main
from hybridkex.exceptions import ConfigurationError
from hybridkex.qkd.kme import KMEPairSettings, SimulatedKMEPair
from hybridkex.qkd.pki import DemoPKI
from hybridkex.qkdlink.mitm import TamperSpec

KEYS = conformance.KEYS
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
#: Every label value a KME may expose: fixed words, the KME IDs and the link's end (no SAE ID, no key).
ALLOWED_LABELS = {"kme", "supply", "endpoint", "status", "role", "reason", "kind"}


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:  # a loopback http URL from the pair
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode("utf-8")
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert set(s.labels) <= ALLOWED_LABELS, s
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def start(pki: DemoPKI, *, capacity_bits: int = 1 << 20, **link: object) -> SimulatedKMEPair:
    settings = KMEPairSettings(link=fast_settings(**link), capacity_bits=capacity_bits, saes_b=("sae-b", "sae-c"),
                               metrics=True)
    return SimulatedKMEPair.start(pki, settings=settings)


def wait(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "the link did not get there in time"
        time.sleep(0.05)


def status(pair: SimulatedKMEPair, pki: DemoPKI, side: str) -> dict[str, object]:
    if side == "a":
        return conformance.req(pair, pki, "a", "GET", f"{KEYS}/sae-b/status").json  # type: ignore[no-any-return]
    return conformance.req(pair, pki, "b", "GET", f"{KEYS}/sae-a/status", name="sae-b").json  # type: ignore[no-any-return]


def steady(status: dict[str, object]) -> dict[str, object]:
    """A status without its wall-clock rate, which changes with every call."""
    ext = dict(status["status_extension"])  # type: ignore[call-overload]
    del ext["delivered_rate_bps_wall"]
    return status | {"status_extension": ext}


def test_each_kme_serves_its_own_figures_and_they_match_its_etsi_status(pki: DemoPKI) -> None:
    # A small store: once it is full Bob starts no block, so the figures hold still while we compare.
    with start(pki, capacity_bits=4096) as pair:
        assert pair.metrics_url_a.startswith("http://127.0.0.1:") and pair.metrics_url_a != pair.metrics_url_b
        wait(lambda: pair.store.stats().available_bits >= 4096)
        calls = {"a": 0, "b": 0}
        for side, url, master in (("a", pair.metrics_url_a, "alice"), ("b", pair.metrics_url_b, "bob")):
            for _ in range(20):  # a block that was under way may still land: compare once nothing moved
                before = status(pair, pki, side)
                m = scrape(url)
                after = status(pair, pki, side)
                calls[side] += 2
                if steady(before) == steady(after):
                    break
            else:
                raise AssertionError("the link's figures kept moving")
            ext = after["status_extension"]
            assert isinstance(ext, dict) and ext["link_side"] == master
            assert value(m, "hybridkex_kme_stored_keys") == after["stored_key_count"] > 0
            assert value(m, "hybridkex_kme_max_keys") == after["max_key_count"] == 16
            assert value(m, "hybridkex_kme_key_store_fill_ratio") == 1.0
            assert value(m, "hybridkex_qkdlink_up") == 1.0
            assert value(m, "hybridkex_qkdlink_blocks_completed_total") == ext["blocks_ok"] >= 2
            assert value(m, "hybridkex_qkdlink_blocks_started_total") == ext["blocks_started"]
            assert sum(value(m, "hybridkex_qkdlink_blocks_aborted_total", reason=r) for r in
                       ("qber", "verification", "authentication", "no_secret_key", "abandoned", "other")
                       ) == ext["blocks_aborted"] == 0
            assert value(m, "hybridkex_qkdlink_qber") == ext["qber"]
            assert value(m, "hybridkex_qkdlink_qber_mean") == pytest.approx(ext["qber_mean"], rel=1e-12)
            assert 0.02 < value(m, "hybridkex_qkdlink_qber_mean") < 0.05
            assert value(m, "hybridkex_qkdlink_secret_key_rate_bps") == pytest.approx(ext["secret_key_rate_bps"])
            net = value(m, "hybridkex_qkdlink_net_key_rate_bps")
            assert value(m, "hybridkex_qkdlink_secret_key_rate_bps") > net == pytest.approx(ext["net_key_rate_bps"])
            assert net > 0
            assert value(m, "hybridkex_qkdlink_auth_consumed_bits_total") == ext["auth_consumed_bits"] > 0
            assert value(m, "hybridkex_qkdlink_auth_available_bits") == ext["auth_available_bits"] > 0
            assert value(m, "hybridkex_qkdlink_auth_reserved_bits_total") == ext["auth_reserved_bits"]
            assert value(m, "hybridkex_qkdlink_key_bits_delivered_total") == ext["key_bits_delivered"]
            assert value(m, "hybridkex_qkdlink_distance_km") == ext["distance_km"] == 1.0
            assert sum(value(m, "hybridkex_qkdlink_alarms_total", kind=k) for k in
                       ("qber", "authentication", "replay", "stopped")) == ext["alarms"] == 0
            kme_id = pair.kme_id_a if side == "a" else pair.kme_id_b
            assert value(m, "hybridkex_kme_info", kme=kme_id, supply="bb84") == 1.0

        keys = conformance.enc(pair, pki, 2, 256)
        ids = {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
        got = conformance.req(pair, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name="sae-b", body=ids)
        assert got.status == 200
        refused = conformance.req(pair, pki, "a", "GET", f"{KEYS}/sae-b/status", name="sae-c")  # sae-c is B's
        assert refused.status == 401
        a, b = scrape(pair.metrics_url_a), scrape(pair.metrics_url_b)
    # Each KME counts its own requests only: the two registries never mix.
    assert value(a, "hybridkex_kme_requests_total", endpoint="status", status="200") == calls["a"]
    assert value(b, "hybridkex_kme_requests_total", endpoint="status", status="200") == calls["b"]
    assert value(a, "hybridkex_kme_requests_total", endpoint="status", status="401") == 1
    assert value(b, "hybridkex_kme_requests_total", endpoint="status", status="401") == 0
    assert value(a, "hybridkex_kme_requests_total", endpoint="enc_keys", status="200") == 1
    assert value(b, "hybridkex_kme_requests_total", endpoint="dec_keys", status="200") == 1
    assert value(a, "hybridkex_kme_requests_total", endpoint="dec_keys", status="200") == 0
    assert value(a, "hybridkex_kme_keys_served_total", role="master") == 2
    assert value(a, "hybridkex_kme_keys_served_total", role="slave") == 0
    assert value(b, "hybridkex_kme_keys_served_total", role="slave") == 2
    assert value(a, "hybridkex_kme_refused_connections_total") == 0


def test_an_eavesdropper_shows_as_qber_aborts_and_alarms(pki: DemoPKI) -> None:
    with start(pki, eavesdrop_fraction=0.1) as pair:
        assert pair.link is not None
        link = pair.link
        wait(lambda: bool(link.pair.bob.stats.fatal))  # Eve's aborts burn the bootstrap: the link stops
        ext = status(pair, pki, "b")["status_extension"]
        m = scrape(pair.metrics_url_b)
    assert isinstance(ext, dict)
    assert value(m, "hybridkex_qkdlink_blocks_aborted_total", reason="qber") == ext["blocks_aborted_qber"] >= 3
    assert value(m, "hybridkex_qkdlink_alarms_total", kind="qber") == ext["blocks_aborted_qber"]
    assert value(m, "hybridkex_qkdlink_alarms_total", kind="stopped") == 1
    assert value(m, "hybridkex_qkdlink_blocks_completed_total") == 0
    assert value(m, "hybridkex_qkdlink_up") == 0.0
    assert value(m, "hybridkex_kme_stored_keys") == 0  # no key from an aborted block
    assert value(m, "hybridkex_qkdlink_qber_mean") > ext["qber_threshold"]  # type: ignore[operator]


def test_a_man_in_the_middle_shows_as_authentication_aborts_and_alarms(pki: DemoPKI) -> None:
    with start(pki, mitm=TamperSpec("flip", 0.05, seed=3)) as pair:
        assert pair.link is not None
        link = pair.link
        wait(lambda: link.pair.bob.stats.aborted_auth + link.pair.alice.stats.aborted_auth >= 1)
        a, b = scrape(pair.metrics_url_a), scrape(pair.metrics_url_b)
    alarms = sum(value(m, "hybridkex_qkdlink_alarms_total", kind="authentication") for m in (a, b))
    aborted = sum(value(m, "hybridkex_qkdlink_blocks_aborted_total", reason="authentication") for m in (a, b))
    assert alarms >= 1 and aborted >= 1


def test_a_fixed_rate_pair_has_store_metrics_and_no_link_metrics(make_pair: Callable[..., SimulatedKMEPair],
                                                                 pki: DemoPKI) -> None:
    pair = make_pair(rate_bps=0, capacity_bits=4096, initial_bits=1024, metrics=True)
    m = scrape(pair.metrics_url_a)
    st = status(pair, pki, "a")
    assert value(m, "hybridkex_kme_stored_keys") == st["stored_key_count"] == 4
    assert value(m, "hybridkex_kme_key_store_fill_ratio") == 0.25
    assert value(m, "hybridkex_kme_info", kme=pair.kme_id_a, supply="model") == 1.0
    assert not any(name.startswith("hybridkex_qkdlink_") for name, _ in m)


def raw_request(url: str, request: bytes) -> bytes:
    host, port = url.split("/")[2].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        return conn.recv(200)


def test_the_metrics_listener_serves_metrics_only_and_a_bad_request_is_one_quiet_400(
        make_pair: Callable[..., SimulatedKMEPair], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    pair = make_pair(metrics=True)
    url = pair.metrics_url_a
    assert raw_request(url, b"GET /metrics HTTP/1.1\r\nBad Header Line\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert raw_request(url, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").startswith(
        b"HTTP/1.1 405")
    assert raw_request(url, b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 404")  # the ETSI API is on the mutual-TLS port only
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert any("malformed HTTP request answered 400" in r.getMessage() for r in caplog.records)


def test_a_refused_connection_is_counted(make_pair: Callable[..., SimulatedKMEPair]) -> None:
    pair = make_pair(max_connections=1, metrics=True)
    port = int(pair.url_a.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as held, socket.create_connection(("127.0.0.1", port)) as extra:
        extra.settimeout(5)
        assert extra.recv(1) == b""  # closed at accept: the one slot is held
        del held
    assert value(scrape(pair.metrics_url_a), "hybridkex_kme_refused_connections_total") == 1


def test_a_busy_metrics_port_is_a_clear_error(pki: DemoPKI) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigurationError, match=rf"metrics_port_b.*127\.0\.0\.1:{port} .*in use"):
            SimulatedKMEPair.start(pki, metrics=True, metrics_port_b=port, saes_b=("sae-b", "sae-c"))


@pytest.mark.parametrize("argv", [["--metrics-port-a", "9100"], ["--metrics-host", "0.0.0.0"]])
def test_metrics_options_without_metrics_are_one_line_errors(argv: list[str], pki: DemoPKI,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kme", "--pki", str(pki.directory), *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs --metrics" in err, err


def test_the_kme_command_prints_and_serves_both_metrics_urls(pki: DemoPKI) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hybridkex", "kme", "--pki", str(pki.directory), "--metrics",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = dict(proc.stdout.readline().split() for _ in range(4))
        assert set(lines) == {"KME-A", "KME-B", "KME-A-METRICS", "KME-B-METRICS"}
        a, b = scrape(lines["KME-A-METRICS"]), scrape(lines["KME-B-METRICS"])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert value(a, "hybridkex_kme_info", kme="kme-a", supply="model") == 1.0
    assert value(b, "hybridkex_kme_info", kme="kme-b", supply="model") == 1.0
    assert value(a, "hybridkex_kme_key_store_fill_ratio") == 1.0  # the fixed-rate store starts full
