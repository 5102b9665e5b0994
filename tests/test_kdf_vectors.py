"""Published test vectors: ETSI TS 103 744 V1.2.1 CatKDF/CasKDF (all 72 outputs) and RFC 5869."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kat import load_vectors

from hybridkex.exceptions import ConfigurationError
from hybridkex.hazmat import _keccak
from hybridkex.hazmat.kdf import CasRound, CatKDF, cas_kdf, cat_kdf, hkdf, hkdf_expand, hkdf_extract

ETSI = load_vectors("etsi_ts103744_v1.2.1_catkdf_caskdf.json")
RFC5869 = load_vectors("rfc5869_hkdf.json")


def _harness_message(cid: str, fields: list[bytes]) -> bytes:
    """The ETSI harness's MA/MB format: cid || (u32(2*len) || field)*; lengths count hex characters."""
    out = bytes.fromhex(cid)
    for f in fields:
        out += (2 * len(f)).to_bytes(4, "big") + f
    return out


def _kdf_name(vset: dict, kind: str) -> str:
    sha = "sha256" if vset["hash"] == "SHA-256" else "sha384"
    return {"HKDF": f"hkdf-{sha}", "HMAC": f"hmac-{sha}", "KMAC": vset["kmac"].lower()}[kind]


ETSI_CASES = [
    pytest.param(vset, name, test, id=f"set{vset['index']}-{vset['ecdh']}-{vset['kem']}-{name}")
    for vset in ETSI["sets"]
    for name, test in vset["tests"].items()
]


def test_etsi_vector_count() -> None:
    assert len(ETSI_CASES) == 72


@pytest.mark.parametrize(("vset", "name", "test"), ETSI_CASES)
def test_etsi_ts103744(vset: dict, name: str, test: dict) -> None:
    def h(key: str) -> bytes:
        return bytes.fromhex(vset[key])

    combiner, kind = name.split("-")
    kdf = _kdf_name(vset, kind)
    context = ETSI["info"].encode()
    length = vset["key_length_bytes"]
    k1, k2 = h("k1_ecdh_shared_secret"), h("k2_kem_shared_secret")
    cid = test["cid"]
    if combiner == "CatKDF":
        ma = _harness_message(cid, [h("LA1"), h("PA1_ecdh_public_A"), h("PA2_kem_encapsulation_key")])
        mb = _harness_message(cid, [h("LB1"), h("PB1_ecdh_public_B"), h("PB2_kem_ciphertext")])
        if "MA" in test:  # the file stores the assembled messages for some cases: take those raw bytes
            assert ma == bytes.fromhex(test["MA"]) and mb == bytes.fromhex(test["MB"])
            ma, mb = bytes.fromhex(test["MA"]), bytes.fromhex(test["MB"])
        label = bytes(a ^ b for a, b in zip(h("LA1"), h("LB1"), strict=True))
        out = cat_kdf([k1, k2], ma=ma, mb=mb, context=context, label=label, length=length, kdf=kdf)
        assert out.hex().upper() == test["expected_key_material"]
    else:
        rounds = []
        for i, (secret, pa, pb) in enumerate(
            [(k1, "PA1_ecdh_public_A", "PB1_ecdh_public_B"), (k2, "PA2_kem_encapsulation_key", "PB2_kem_ciphertext")],
            start=1,
        ):
            label = bytes(a ^ b for a, b in zip(h(f"LA{i}"), h(f"LB{i}"), strict=True))
            rounds.append(CasRound(secret, _harness_message(cid, [h(f"LA{i}"), h(pa)]),
                                   _harness_message(cid, [h(f"LB{i}"), h(pb)]), label))
        out, chain = cas_kdf(rounds, context=context, length=length, kdf=kdf)
        assert out.hex().upper() == test["expected_key_material2"]
        inter = test.get("intermediates_computed_by_us")
        if inter:
            assert chain.hex().upper() == inter[-1]["chain_secret"]


def test_prepared_catkdf_gives_the_published_outputs() -> None:
    """CatKDF (MA, MB and the label taken once) derives every published CatKDF output, for each
    KDF (HKDF, HMAC, KMAC) and output length, and again from the same object (its state is reused)."""
    checked = 0
    for vset, name, test in (p.values for p in ETSI_CASES):
        if not name.startswith("CatKDF"):
            continue
        h = lambda key: bytes.fromhex(vset[key])  # noqa: E731, B023 - used in this iteration only
        cid = test["cid"]
        ma = _harness_message(cid, [h("LA1"), h("PA1_ecdh_public_A"), h("PA2_kem_encapsulation_key")])
        mb = _harness_message(cid, [h("LB1"), h("PB1_ecdh_public_B"), h("PB2_kem_ciphertext")])
        label = bytes(a ^ b for a, b in zip(h("LA1"), h("LB1"), strict=True))
        kdf = _kdf_name(vset, name.split("-")[1])
        cat = CatKDF(ma=ma, mb=mb, label=label, length=vset["key_length_bytes"], kdf=kdf)
        ikm = h("k1_ecdh_shared_secret") + h("k2_kem_shared_secret")
        for _ in range(2):
            assert cat.derive(ikm, ETSI["info"].encode()).hex().upper() == test["expected_key_material"]
        checked += 1
    assert checked == 36


@pytest.mark.parametrize("case", RFC5869["cases"], ids=lambda c: f"A.{c['case']}-{c['hash']}")
def test_rfc5869(case: dict) -> None:
    hash_name = case["hash"].replace("-", "").lower()
    salt = bytes.fromhex(case["salt"]) if case["salt"] is not None else b""
    ikm, info = bytes.fromhex(case["IKM"]), bytes.fromhex(case["info"])
    assert hkdf_extract(hash_name, salt, ikm).hex() == case["PRK"]
    assert hkdf(hash_name, salt=salt, ikm=ikm, info=info, length=case["L"]).hex() == case["OKM"]


def test_hkdf_rejects_bad_lengths() -> None:
    prk = bytes(32)
    with pytest.raises(ConfigurationError):
        hkdf_expand("sha256", prk, b"", 255 * 32 + 1)
    with pytest.raises(ConfigurationError):
        hkdf_expand("sha256", prk, b"", 0)
    with pytest.raises(ConfigurationError):
        hkdf_expand("sha256", bytes(16), b"", 32)  # PRK shorter than HashLen
    with pytest.raises(ConfigurationError):
        hkdf_extract("md5", b"", b"")


def test_unknown_kdf_rejected() -> None:
    with pytest.raises(ConfigurationError, match="unsupported KDF"):
        cat_kdf([b"x"], ma=b"", mb=b"", context=b"", label=b"", length=16, kdf="hkdf-md5")


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=400))
def test_keccak_matches_hashlib(data: bytes) -> None:
    """Our Keccak sponge (used only for KMAC) against hashlib's SHA3 and SHAKE."""
    assert _keccak.keccak(136, data, 0x06, 32) == hashlib.sha3_256(data).digest()
    assert _keccak.keccak(168, data, 0x1F, 50) == hashlib.shake_128(data).digest(50)
    assert _keccak.cshake(256, data, 40, b"", b"") == hashlib.shake_256(data).digest(40)


def test_kmac_sp800_185_sample() -> None:
    """NIST SP 800-185 KMAC128 sample #1 (key 0x40..0x5F, data 00010203, no customization, 256 bits)."""
    key = bytes(range(0x40, 0x60))
    out = _keccak.kmac(128, key, bytes.fromhex("00010203"), 32, b"")
    assert out.hex().upper() == "E5780B0D3EA6F7D3A429C5706AA43A00FADBD7D49628839E3187243F456EE14E"
