"""The hybridkex-v1 combiner: our known-answer vectors and the properties the spec claims."""

from __future__ import annotations

import base64
import pickle

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import given, settings
from hypothesis import strategies as st
from kat import load_vectors

from hybridkex import (
    SUITES,
    AlreadyFinalized,
    ConfigurationError,
    InvalidKeyMaterial,
    PartyView,
    QKDBinding,
    combine,
    encode_party,
    get_suite,
)
from hybridkex.combiner import combine_raw
from hybridkex.hazmat import labels
from hybridkex.hazmat.encoding import u32
from hybridkex.hazmat.kdf import cat_kdf, context_function
from hybridkex.hazmat.kem import get_kem
from hybridkex.io.reconnect import reconnect_identity, reconnect_psk, session_handle

KAT = load_vectors("hybridkex-v1.json")


@pytest.mark.parametrize("case", KAT["cases"], ids=lambda c: c["description"])
def test_known_answer_vectors(case: dict) -> None:
    """Every field of tests/vectors/hybridkex-v1.json is re-derived from its inputs."""
    h = bytes.fromhex
    suite = get_suite(case["suite"])
    assert case["suite_code"] == suite.code
    # components: X25519 from the private keys, ML-KEM by decapsulating the frozen ciphertext
    xa = x25519.X25519PrivateKey.from_private_bytes(h(case["x25519_private_a"]))
    xb = x25519.X25519PrivateKey.from_private_bytes(h(case["x25519_private_b"]))
    assert xa.public_key().public_bytes_raw() == h(case["x25519_public_a"])
    assert xa.exchange(xb.public_key()) == h(case["x25519_secret"])
    pq = get_kem(suite.pq_kem)
    sk = pq.from_seed(h(case["mlkem_seed"]))  # type: ignore[attr-defined]
    assert sk.public_bytes() == h(case["mlkem_ek"])
    assert sk.decapsulate(h(case["mlkem_ct"])) == h(case["mlkem_secret"])
    # MA / MB from the structured fields
    binding = None
    if case["qkd_binding"]:
        b = case["qkd_binding"]
        binding = QKDBinding(key_ids=tuple(case["qkd_key_ids"]), **b)
    ma = encode_party(suite, PartyView("initiator", h(case["identity_a"]), h(case["nonce_a"]),
                                       h(case["x25519_public_a"]), h(case["mlkem_ek"])), binding)
    mb = encode_party(suite, PartyView("responder", h(case["identity_b"]), h(case["nonce_b"]),
                                       h(case["x25519_public_b"]), h(case["mlkem_ct"])), binding)
    assert ma == h(case["ma"]) and mb == h(case["mb"])
    assert h(case["label"]) == labels.combiner_label(suite.label)
    assert h(case["context"]) == labels.COMBINER_CONTEXT
    assert context_function(suite.kdf, labels.COMBINER_CONTEXT, ma, mb) == h(case["kdf_context_hash"])
    # S through the generic CatKDF, written out from the spec (independent of combine_raw's ordering code)
    q, xs, ms = h(case["qkd_key"]), h(case["x25519_secret"]), h(case["mlkem_secret"])
    if case["ordering"] == "etsi":
        generic = cat_kdf([xs, ms], psk=q, ma=ma, mb=mb, context=h(case["context"]), label=h(case["label"]),
                          length=suite.hash_len, kdf=case["kdf"])
    else:
        generic = cat_kdf([ms, xs, q] if q else [ms, xs], ma=ma, mb=mb, context=h(case["context"]),
                          label=h(case["label"]), length=suite.hash_len, kdf=case["kdf"])
    assert generic == h(case["combined_secret"])
    assert combine_raw(suite, qkd_key=q, x25519_secret=xs, pq_secret=ms, ma=ma, mb=mb) == h(case["combined_secret"])
    secret = combine(suite, qkd_key=q, x25519_secret=xs, pq_secret=ms, ma=ma, mb=mb)
    assert secret.tls_psk() == h(case["tls_psk"])
    assert secret.derive(labels.TLS_PSK_IDENTITY, 16) == h(case["tls_psk_identity_bytes"])
    # The identity is text (docs/spec.md 4.3): prefix, then unpadded base64url of the derived bytes.
    b64 = base64.urlsafe_b64encode(h(case["tls_psk_identity_bytes"])).rstrip(b"=")
    assert secret.tls_identity() == b"hk1-psk." + b64 == case["tls_psk_identity"].encode("ascii")
    assert secret.next_auth_key() == h(case["next_auth_key"])
    rc = case["reconnect_1"]
    assert session_handle(secret) == h(rc["handle"])
    assert secret.derive(labels.RECONNECT_IDENTITY, 16, u32(1)) == h(rc["tag"])
    raw = h(rc["handle"]) + u32(1) + h(rc["tag"])
    assert reconnect_identity(secret, 1) == b"hk1-rc." + base64.urlsafe_b64encode(raw) == rc["identity"].encode()
    assert reconnect_psk(secret, 1) == h(rc["psk"])


def test_vectors_cover_what_the_issue_asks() -> None:
    cases = KAT["cases"]
    assert len(cases) >= 5
    assert any(c["qkd_key"] for c in cases) and any(not c["qkd_key"] for c in cases)
    assert {get_suite(c["suite"]).hash for c in cases} == {"sha256", "sha384"}
    for c in cases:
        for fieldname in ("qkd_key", "x25519_secret", "mlkem_secret", "ma", "mb", "label", "context",
                          "combined_secret", "mlkem_encaps_m"):
            bytes.fromhex(c[fieldname])


# --- properties ----------------------------------------------------------------------------------------

SUITE = get_suite("x25519-mlkem768-qkd-hkdfsha256")
BASE = {
    "qkd_key": bytes(range(32)),
    "x25519_secret": bytes(range(32, 64)),
    "pq_secret": bytes(range(64, 96)),
    "ma": b"MA" * 700,
    "mb": b"MB" * 650,
}
BASE_OUT = combine_raw(SUITE, **BASE)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(BASE)), st.data())
def test_any_single_byte_change_changes_output(field: str, data: st.DataObject) -> None:
    value = bytearray(BASE[field])
    i = data.draw(st.integers(0, len(value) - 1))
    value[i] ^= data.draw(st.integers(1, 255))
    changed = dict(BASE, **{field: bytes(value)})
    assert combine_raw(SUITE, **changed) != BASE_OUT


def test_swapping_components_changes_output() -> None:
    swaps = [
        dict(BASE, x25519_secret=BASE["pq_secret"], pq_secret=BASE["x25519_secret"]),
        dict(BASE, qkd_key=BASE["x25519_secret"], x25519_secret=BASE["qkd_key"]),
        dict(BASE, ma=BASE["mb"], mb=BASE["ma"]),
    ]
    for args in swaps:
        assert combine_raw(SUITE, **args) != BASE_OUT


def test_suites_are_domain_separated() -> None:
    outs = {combine_raw(s, **(BASE if s.qkd else dict(BASE, qkd_key=b"")))[:32] for s in SUITES.values()
            if s.backend == "cryptography" and s.pq_kem == "ML-KEM-768"}
    assert len(outs) == 4  # 768 suites: qkd/no-qkd x etsi/sp800-56c


@pytest.mark.parametrize(("field", "length"), [("qkd_key", 31), ("qkd_key", 33), ("x25519_secret", 31),
                                               ("pq_secret", 33), ("qkd_key", 0)])
def test_wrong_lengths_raise(field: str, length: int) -> None:
    with pytest.raises(InvalidKeyMaterial, match="must be"):
        combine_raw(SUITE, **dict(BASE, **{field: bytes(length)}))


def test_all_zero_x25519_rejected_and_qkd_refused_without_qkd_suite() -> None:
    with pytest.raises(InvalidKeyMaterial, match="all zero"):
        combine_raw(SUITE, **dict(BASE, x25519_secret=bytes(32)))
    with pytest.raises(InvalidKeyMaterial, match="no QKD component"):
        combine_raw("x25519-mlkem768-hkdfsha256", **BASE)
    with pytest.raises(ConfigurationError, match="unknown suite"):
        combine_raw("x25519-rsa", **BASE)


def test_every_purpose_label_gives_a_distinct_key() -> None:
    secret = combine(SUITE, **BASE)
    outputs = {secret.derive(p, 32) for p in labels.PURPOSES}
    assert len(outputs) == len(labels.PURPOSES)
    assert secret.exporter(b"app", 32) != secret.exporter(b"app2", 32)
    assert secret.exporter(b"app", 32, b"ctx") != secret.exporter(b"app", 32)


def test_combined_secret_is_opaque_and_erasable() -> None:
    secret = combine(SUITE, **BASE)
    raw = combine_raw(SUITE, **BASE)
    text = repr(secret) + str(secret)
    assert raw.hex() not in text and "redacted" in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    other = combine(SUITE, **BASE)
    assert secret.equals(other)
    secret.erase()
    assert "erased" in repr(secret)
    with pytest.raises(AlreadyFinalized):
        secret.tls_psk()


def test_encode_party_is_injective_on_field_boundaries() -> None:
    a = encode_party(SUITE, PartyView("initiator", b"ab", b"c", bytes(32), b"k"), None)
    b = encode_party(SUITE, PartyView("initiator", b"a", b"bc", bytes(32), b"k"), None)
    assert a != b
    with pytest.raises(ConfigurationError):
        encode_party(SUITE, PartyView("attacker", b"a", b"b", bytes(32), b"k"), None)  # type: ignore[arg-type]


def test_identity_limit_is_the_handshakes_1_to_255_bytes() -> None:
    """docs/spec.md 4.2 and 6.2 state one limit; 0.1.0's combiner allowed 1024 bytes and empty ones."""
    encode_party(SUITE, PartyView("initiator", b"x" * 255, bytes(32), bytes(32), b"k"), None)
    for bad in (b"", b"x" * 256, b"x" * 1024):
        with pytest.raises(ConfigurationError, match=r"1\.\.255"):
            encode_party(SUITE, PartyView("initiator", bad, bytes(32), bytes(32), b"k"), None)
    # The configuration refuses the same identities, so a handshake can always encode them.
    from hybridkex.protocol import InitiatorConfig, PSKAuthenticator

    with pytest.raises(ConfigurationError, match="255"):
        InitiatorConfig("x" * 256, [PSKAuthenticator({"peer": bytes(32)})], peer_identity="peer")
    with pytest.raises(ConfigurationError, match="255"):
        InitiatorConfig("", [PSKAuthenticator({"peer": bytes(32)})], peer_identity="peer")


def test_qkd_binding_changes_output() -> None:
    """Substituting a key ID or an SAE ID in the binding changes MA and so the key (dependent-key attacks)."""
    view = PartyView("initiator", b"a", bytes(32), bytes(32), b"k")
    kid = "0b5f1f1e-6f4e-4a53-9a57-2a4a3c1f6f10"
    b1 = QKDBinding(key_ids=(kid,), master_sae_id="sae-b", slave_sae_id="sae-a",
                    master_kme_id="kme-b", slave_kme_id="kme-a")
    variants = [
        QKDBinding(key_ids=("0b5f1f1e-6f4e-4a53-9a57-2a4a3c1f6f11",), master_sae_id="sae-b", slave_sae_id="sae-a",
                   master_kme_id="kme-b", slave_kme_id="kme-a"),
        QKDBinding(key_ids=(kid,), master_sae_id="sae-a", slave_sae_id="sae-b",
                   master_kme_id="kme-b", slave_kme_id="kme-a"),
        QKDBinding(key_ids=(kid,), master_sae_id="sae-b", slave_sae_id="sae-c",
                   master_kme_id="kme-b", slave_kme_id="kme-a"),
        QKDBinding(key_ids=(kid,), master_sae_id="sae-b", slave_sae_id="sae-a",
                   master_kme_id="kme-b", slave_kme_id="kme-c"),
    ]
    base = encode_party(SUITE, view, b1)
    assert all(encode_party(SUITE, view, v) != base for v in variants)


def test_end_to_end_with_real_kems() -> None:
    x, pq = get_kem("X25519"), get_kem("ML-KEM-768")
    xa, pa = x.generate(), pq.generate()
    ss_x, x_ct = x.encapsulate(xa.public_bytes())
    ss_m, m_ct = pq.encapsulate(pa.public_bytes())
    ma = encode_party(SUITE, PartyView("initiator", b"a", bytes(32), xa.public_bytes(), pa.public_bytes()), None)
    mb = encode_party(SUITE, PartyView("responder", b"b", bytes(32), x_ct, m_ct), None)
    k = bytes(32)
    s1 = combine(SUITE, qkd_key=k, x25519_secret=ss_x, pq_secret=ss_m, ma=ma, mb=mb)
    s2 = combine(SUITE, qkd_key=k, x25519_secret=xa.decapsulate(x_ct), pq_secret=pa.decapsulate(m_ct), ma=ma, mb=mb)
    assert s1.equals(s2)


def test_spec_documents_every_purpose_label() -> None:
    """docs/spec.md section 4.3 is normative: every label the code derives with must be in it."""
    from pathlib import Path

    spec = (Path(__file__).resolve().parent.parent / "docs" / "spec.md").read_text(encoding="utf-8")
    for label in labels.PURPOSES:
        assert f"`{label.decode()}`" in spec, label
