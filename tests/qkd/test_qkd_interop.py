"""Interoperability of the simulated KME with independent ETSI GS QKD 014 clients from PyPI.

* ``etsi-qkd-014-client`` 0.9.0 through its Python API (its CLI exits 0 even on HTTP errors);
* ``qkdsec`` 0.3.0: its client, its conformance probes, and ``qkdsec doctor`` as a smoke check.
  Its expectation of 404 for an unknown key ID contradicts the spec (400) and is never asserted.

Keys a peer client takes as master are fetched by ID as slave with the other peer client, with ours,
and the reverse, and must match byte for byte.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from etsi_qkd_014_client import QKD014Client
from etsi_qkd_014_client.data import DataError, DataKeyContainer, DataStatus
from qkdhelpers import sae_args
from qkdsec.client import ETSI014Client as QkdsecClient
from qkdsec.client.errors import KMEHTTPError
from qkdsec.doctor import probes

from hybridkex.qkd import ETSI014Client
from hybridkex.qkd.etsi014 import (
    MSG_EXTENSION_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SIZE_NOT_MULTIPLE_OF_8,
    MSG_UNAUTHORIZED,
)
from hybridkex.qkd.kme import SimulatedKMEPair
from hybridkex.qkd.pki import DemoPKI


def hostport(url: str) -> str:
    return url.removeprefix("https://")


def etsi(kmes: SimulatedKMEPair, name: str) -> QKD014Client:
    pki = kmes.pki
    return QKD014Client(hostport(kmes.url_for(name)), str(pki.cert(name)), str(pki.key(name)), str(pki.ca_cert))


def qkdsec(kmes: SimulatedKMEPair, name: str) -> QkdsecClient:
    pki = kmes.pki
    return QkdsecClient(kmes.url_for(name), client_cert=(str(pki.cert(name)), str(pki.key(name))),
                        verify=str(pki.ca_cert), timeout=10)


# -- etsi-qkd-014-client ----------------------------------------------------------------------------


def test_etsi_client_status(kmes: SimulatedKMEPair) -> None:
    code, status = etsi(kmes, "sae-a").get_status("sae-b")
    assert code == 200 and isinstance(status, DataStatus)
    assert (status.source_kme_id, status.target_kme_id) == ("kme-a", "kme-b")
    assert (status.master_sae_id, status.slave_sae_id) == ("sae-a", "sae-b")
    assert status.key_size == 256 and status.max_sae_id_count == 4


@pytest.mark.parametrize(("number", "size"), [(None, None), (3, None), (2, 512)])
def test_etsi_client_master_and_slave_keys_match(kmes: SimulatedKMEPair, number: int | None, size: int | None) -> None:
    code, container = etsi(kmes, "sae-a").get_key("sae-b", number=number, size=size)
    assert code == 200 and isinstance(container, DataKeyContainer)
    assert len(container.keys) == (number or 1)
    for k in container.keys:
        assert len(base64.b64decode(k.key)) * 8 == (size or 256)
    code, fetched = etsi(kmes, "sae-b").get_key_with_key_IDs("sae-a", [k.key_id for k in container.keys])
    assert code == 200 and isinstance(fetched, DataKeyContainer)
    assert [(k.key_id, k.key) for k in fetched.keys] == [(k.key_id, k.key) for k in container.keys]


def test_etsi_client_keys_fetched_by_our_client_and_vice_versa(kmes: SimulatedKMEPair) -> None:
    code, container = etsi(kmes, "sae-a").get_key("sae-b", number=2)
    assert code == 200
    with kmes.key_source("sae-b") as ours:
        got = ours.get_keys_by_id("sae-a", [k.key_id for k in container.keys])
    assert [base64.b64encode(k.key).decode() for k in got] == [k.key for k in container.keys]

    with kmes.key_source("sae-a") as ours:
        mine = ours.get_keys("sae-b", 2, 384)
    code, fetched = etsi(kmes, "sae-b").get_key_with_key_IDs("sae-a", [k.key_id for k in mine])
    assert code == 200
    assert [base64.b64decode(k.key) for k in fetched.keys] == [k.key for k in mine]


def test_etsi_client_sees_spec_errors_as_json(kmes: SimulatedKMEPair) -> None:
    code, err = etsi(kmes, "sae-b").get_key_with_key_IDs("sae-a", [str(uuid.uuid4())])
    assert code == 400 and isinstance(err, DataError) and err.message == MSG_KEYS_NOT_FOUND
    code, err = etsi(kmes, "sae-a").get_key("sae-b", size=100)
    assert code == 400 and isinstance(err, DataError) and err.message == MSG_SIZE_NOT_MULTIPLE_OF_8
    code, err = etsi(kmes, "sae-a").get_key("sae-b", extension_mandatory=[{"abc_route_type": "direct"}])
    assert code == 400 and isinstance(err, DataError) and err.message == MSG_EXTENSION_MANDATORY_UNSUPPORTED
    # A key for sae-b, asked for by sae-c (also served by KME B): 401, still with a JSON Error body.
    code, container = etsi(kmes, "sae-a").get_key("sae-b")
    assert code == 200
    code, err = etsi(kmes, "sae-c").get_key_with_key_IDs("sae-a", [container.keys[0].key_id])
    assert code == 401 and isinstance(err, DataError) and err.message == MSG_UNAUTHORIZED
    # sae-b is not served by KME A at all.
    code, err = QKD014Client(hostport(kmes.url_a), str(kmes.pki.cert("sae-b")), str(kmes.pki.key("sae-b")),
                             str(kmes.pki.ca_cert)).get_status("sae-a")
    assert code == 401 and isinstance(err, DataError) and err.message == MSG_UNAUTHORIZED
    # The slave still gets the key after the refused attempt.
    code, fetched = etsi(kmes, "sae-b").get_key_with_key_IDs("sae-a", [container.keys[0].key_id])
    assert code == 200 and fetched.keys[0].key == container.keys[0].key


# -- qkdsec -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_qkdsec_master_and_slave_keys_match(kmes: SimulatedKMEPair, method: str) -> None:
    with qkdsec(kmes, "sae-a") as master, qkdsec(kmes, "sae-b") as slave:
        status = master.status("sae-b")
        assert status.master_sae_id == "sae-a" and status.max_key_per_request == 128
        container = master.get_enc_keys_container("sae-b", number=3, size=256, method=method)
        assert len(container.keys) == 3 and all(k.size_bits == 256 for k in container.keys)
        # qkdsec names the URL parameter slave_sae_id, but the spec puts the master's ID there.
        fetched = slave.get_dec_keys("sae-a", key_ids=[k.key_id for k in container.keys])
    assert [(k.key_id, k.key) for k in fetched] == [(k.key_id, k.key) for k in container.keys]


def test_qkdsec_and_our_client_share_keys(kmes: SimulatedKMEPair) -> None:
    with kmes.key_source("sae-a") as ours, qkdsec(kmes, "sae-b") as theirs:
        mine = ours.get_keys("sae-b", 2)
        fetched = theirs.get_dec_keys("sae-a", key_ids=[k.key_id for k in mine])
    assert [(k.key_id, k.key) for k in fetched] == [(k.key_id, k.key) for k in mine]


def test_qkdsec_errors(kmes: SimulatedKMEPair) -> None:
    with qkdsec(kmes, "sae-a") as master, qkdsec(kmes, "sae-b") as slave:
        (key,) = master.get_enc_keys("sae-b")
        # The master asking dec_keys for its own key (qkdsec's round-trip probe does this): 401.
        with pytest.raises(KMEHTTPError) as info:
            master.get_dec_keys("sae-b", key_ids=[key.key_id])
        assert (info.value.status_code, info.value.message) == (401, MSG_UNAUTHORIZED)
        assert slave.get_dec_keys("sae-a", key_ids=[key.key_id])[0].key == key.key
        with pytest.raises(KMEHTTPError) as info:  # replay: the spec's 400, not qkdsec's 404
            slave.get_dec_keys("sae-a", key_ids=[key.key_id])
        assert (info.value.status_code, info.value.message) == (400, MSG_KEYS_NOT_FOUND)


def test_qkdsec_probes_pass(kmes: SimulatedKMEPair) -> None:
    with qkdsec(kmes, "sae-a") as client:
        status_result, raw = probes.probe_status_fields(client, "sae-b")
        assert status_result.status.value == "pass", status_result.summary
        assert raw is not None
        for probe in (probes.probe_enc_keys_get, probes.probe_enc_keys_post):
            result, _ = probe(client, "sae-b")
            assert result.status.value == "pass", result.summary
        caps = probes.probe_enc_keys_caps(client, "sae-b", raw["max_key_per_request"], raw["max_key_size"])
        assert caps.status.value == "pass", caps.summary
        for check in (probes.probe_extensions_accepted, probes.probe_error_contract_400):
            result = check(client, "sae-b")
            assert result.status.value == "pass", result.summary


def test_qkdsec_full_battery(kmes: SimulatedKMEPair) -> None:
    """Every probe passes except the two whose expectation contradicts the spec (docs/qkd.md section 7).

    ``dec_keys_roundtrip`` fetches the key with the master's own certificate: a conformant KME answers
    401 (the caller is not the slave), and ours also refuses a master naming itself as its slave, so
    this probe cannot pass against it.  ``error_contract_404`` expects 404 where the spec says 400.
    """
    with qkdsec(kmes, "sae-a") as client:
        report = probes.run_all(client, "sae-b", latency_samples=2)
    by_name = {r.name: r for r in report.results}
    roundtrip = by_name.pop("dec_keys_roundtrip")
    assert roundtrip.status.value == "fail" and "401" in roundtrip.summary
    assert by_name.pop("error_contract_404").status.value in ("pass", "warn")  # their 404 is not the spec
    assert {name: r.status.value for name, r in by_name.items()} == dict.fromkeys(by_name, "pass")


def test_independent_clients_are_refused_a_self_pair(kmes: SimulatedKMEPair) -> None:
    before = kmes.store.stats().keys_issued
    code, error = etsi(kmes, "sae-a").get_key("sae-a", number=1, size=256)
    assert code == 400 and isinstance(error, DataError)
    assert "cannot be a slave of its own keys" in error.message
    code, error = etsi(kmes, "sae-a").get_key("sae-b", number=1, additional_slave_sae_ids=["sae-a"])
    assert code == 400 and isinstance(error, DataError) and "additional_slave_SAE_IDs" in error.message
    with qkdsec(kmes, "sae-a") as master:
        for method in ("GET", "POST"):
            with pytest.raises(KMEHTTPError) as info:
                master.get_enc_keys("sae-a", method=method)
            assert info.value.status_code == 400
    assert kmes.store.stats().keys_issued == before


def test_curl_post_without_a_body_gets_one_default_key(kmes: SimulatedKMEPair) -> None:
    """ETSI 014 cl. 6.2: the Key request may be empty; curl sends ``Content-Length: 0`` and no body."""
    pki = kmes.pki
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    base = ["--silent", "--show-error", "--cacert", str(pki.ca_cert)]
    proc = subprocess.run(
        [curl, *base, "--cert", str(pki.cert("sae-a")), "--key", str(pki.key("sae-a")), "-X", "POST",
         "--data", "", "--write-out", "\\n%{http_code}", f"{kmes.url_a}/api/v1/keys/sae-b/enc_keys"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    body, _, code = proc.stdout.rpartition("\n")
    assert code == "200", body
    (entry,) = json.loads(body)["keys"]
    assert len(base64.b64decode(entry["key"])) == 32  # the Status key_size, 256 bits
    with ETSI014Client(kmes.url_b, **sae_args(pki, "sae-b")) as slave:
        (key,) = slave.get_keys_by_id("sae-a", [entry["key_ID"]])
    assert base64.b64encode(key.key).decode() == entry["key"]


def test_qkdsec_doctor_cli_smoke(kmes: SimulatedKMEPair, tmp_path: Path) -> None:
    pki: DemoPKI = kmes.pki
    exe = Path(__import__("sys").executable).with_name("qkdsec")
    proc = subprocess.run(
        [str(exe), "doctor", kmes.url_a, "--slave-sae-id", "sae-b", "--cert", str(pki.cert("sae-a")),
         "--key", str(pki.key("sae-a")), "--ca-cert", str(pki.ca_cert), "--no-consume", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    statuses = {r["name"]: r["status"] for r in report["results"]}
    assert statuses["reachability"] == "pass" and statuses["status_fields"] == "pass"


def test_our_client_refuses_a_kme_certificate_for_another_id(kmes: SimulatedKMEPair) -> None:
    from hybridkex.qkd import KMEConnectionError

    with ETSI014Client(kmes.url_a, **sae_args(kmes.pki, "sae-a"), kme_id="kme-b") as c, \
            pytest.raises(KMEConnectionError, match="kme-a"):
        c.status("sae-b")
