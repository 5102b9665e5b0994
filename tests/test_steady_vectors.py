"""The steady state's known-answer vectors (tests/vectors/hybridkex-v1-steady.json).

Three checks: re-running the generator reproduces the file byte for byte; every case is recomputed
with hybridkex.steady.derive and, independently, with hmac/hashlib following docs/spec.md section
12 as written (so a spec/implementation mismatch fails, whichever side moved); and tampered
identities and tags are refused.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import json
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from hybridkex.cli import main
from hybridkex.combiner import CombinedSecret, QKDBinding
from hybridkex.hazmat.encoding import b64url, u8, u32
from hybridkex.steady.derive import (
    MAX_ANNOUNCED,
    MAX_USED,
    SteadyIdentity,
    auth_key,
    check_tag,
    identity_tag,
    parse_identity,
    steady_handle,
    steady_psk,
)
from hybridkex.suites import get_suite

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"
DOC = json.loads((VECTORS / "hybridkex-v1-steady.json").read_text(encoding="utf-8"))
CASES = DOC["cases"]
IDS = [c["description"].split(":")[0] for c in CASES]
B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def h(case: dict[str, Any], key: str) -> bytes:
    return bytes.fromhex(case[key])


def test_generator_reproduces_the_file() -> None:
    run = subprocess.run([sys.executable, str(VECTORS / "generate_steady_v1.py")], cwd=ROOT, capture_output=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert run.stdout == (VECTORS / "hybridkex-v1-steady.json").read_bytes()


def test_the_cli_prints_the_file() -> None:
    """`hybridkex vectors --steady` (in this process: a subprocess costs a second of imports)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["vectors", "--steady"]) == 0
    assert out.getvalue() == (VECTORS / "hybridkex-v1-steady.json").read_text(encoding="utf-8")


def test_the_cases_cover_the_format() -> None:
    """Both hashes, with and without a QKD key, the epoch flag, no/some/the maximum announced IDs,
    the counter's extremes: a case lost from the generator fails here."""
    assert {c["hash"] for c in CASES} == {"sha256", "sha384"}
    assert {bool(c["qkd_key_ids"]) for c in CASES} == {True, False}
    assert {c["epoch"] for c in CASES} == {True, False}
    assert {len(c["announced_key_ids"]) for c in CASES} >= {0, 4, MAX_ANNOUNCED}
    assert {1, 2**32 - 1} <= {c["counter"] for c in CASES}


# --- hybridkex ------------------------------------------------------------------------------------


def _binding(case: dict[str, Any]) -> QKDBinding | None:
    if not case["qkd_key_ids"]:
        return None
    r = case["qkd_roles"]
    return QKDBinding(key_ids=tuple(case["qkd_key_ids"]), master_sae_id=r["master_sae_id"],
                      slave_sae_id=r["slave_sae_id"], master_kme_id=r["master_kme_id"], slave_kme_id=r["slave_kme_id"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hybridkex_reproduces_the_case(case: dict[str, Any]) -> None:
    suite = get_suite(case["suite"])
    secret = CombinedSecret(suite, h(case, "parent_combined_secret"))
    a = auth_key(secret)
    assert steady_handle(secret).hex() == case["handle"]
    assert a.hex() == case["auth_key"]
    content = SteadyIdentity(h(case, "handle"), case["counter"], case["epoch"], tuple(case["qkd_key_ids"]),
                             tuple(case["announced_key_ids"]))
    body = content.body()
    assert body.hex() == case["body"]
    assert identity_tag(a, suite, body).hex() == case["tag"]
    assert content.encode(a, suite).decode("ascii") == case["identity"]
    binding = _binding(case)
    assert (binding.encode().hex() if binding else "") == case["psk_inputs"]["qkd_binding"]
    psk = steady_psk(suite, key=a, qkd_key=h(case, "qkd_key"), body=body, binding=binding,
                     client_identity=case["client_identity"], server_identity=case["server_identity"])
    assert psk.hex() == case["psk"]
    # The server's view: the identity parses back to exactly this content, body and tag.
    parsed = parse_identity(case["identity"].encode("ascii"))
    assert parsed is not None
    assert parsed == (content, body, h(case, "tag"))
    assert check_tag(a, suite, parsed[1], parsed[2])


# --- docs/spec.md section 12, written out -----------------------------------------------------------


def lp(x: bytes) -> bytes:
    return struct.pack(">I", len(x)) + x


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1  # RFC 5869 2.3
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([i]), hash_name)
        out, i = out + block, i + 1
    return out[:length]


def derive(hash_name: str, suite: str, s: bytes, purpose: bytes, length: int) -> bytes:
    """Spec 4.3: HKDF-Expand(S, lp("hybridkex/v1") || lp(suite) || lp(purpose) || lp(""), L)."""
    return hkdf_expand(hash_name, s, lp(b"hybridkex/v1") + lp(suite.encode()) + lp(purpose) + lp(b""), length)


def spec_case(case: dict[str, Any]) -> dict[str, Any]:
    """Every value of one steady-state connection from the case's inputs, as section 12 says."""
    hash_name, suite = case["hash"], case["suite"]
    hash_len = hashlib.new(hash_name).digest_size
    s = h(case, "parent_combined_secret")
    handle = derive(hash_name, suite, s, b"steady state handle", 16)  # 12.2
    a = derive(hash_name, suite, s, b"steady state authentication key", hash_len)
    ids = [uuid.UUID(k).bytes for k in case["qkd_key_ids"]]  # 12.3: a key ID is its UUID's 16 bytes
    ann = [uuid.UUID(k).bytes for k in case["announced_key_ids"]]
    flags = 0x01 if case["epoch"] else 0x00
    body = (handle + struct.pack(">IB", case["counter"], flags) + bytes([len(ids)]) + b"".join(ids)
            + bytes([len(ann)]) + b"".join(ann))
    tag = hkdf_expand(hash_name, a, lp(b"hybridkex/v1") + lp(suite.encode()) + lp(b"steady state identity tag")
                      + lp(body), 16)
    identity = "hk1-ss." + base64.urlsafe_b64encode(body + tag).decode("ascii").rstrip("=")
    r = case["qkd_roles"]
    binding = b""
    if ids:  # 12.5: spec 4.2's binding, the client as master, key IDs as canonical (lower-case) text
        binding = (lp(b"".join(lp(str(uuid.UUID(bytes=k)).encode("ascii")) for k in ids))
                   + lp(r["master_sae_id"].encode()) + lp(r["slave_sae_id"].encode())
                   + lp(r["master_kme_id"].encode()) + lp(r["slave_kme_id"].encode()))
    ma = lp(b"hybridkex/v1 initiator") + lp(case["client_identity"].encode("utf-8"))
    mb = lp(b"hybridkex/v1 responder") + lp(case["server_identity"].encode("utf-8"))
    context = lp(b"hybridkex/v1 steady state psk") + lp(body) + lp(binding)
    label = b"hybridkex/v1 CatKDF steady " + suite.encode()
    ikm = h(case, "qkd_key") + a  # CatKDF: psk || k1, psk = the QKD key (or empty), k1 = A
    info = hashlib.new(hash_name, lp(context) + lp(ma) + lp(mb)).digest()  # f_ch, spec 4.1
    psk = hkdf_expand(hash_name, hmac.digest(label, ikm, hash_name), info, hash_len)
    return {"handle": handle.hex(), "auth_key": a.hex(), "body": body.hex(), "tag": tag.hex(), "identity": identity,
            "psk_inputs": {"label": label.hex(), "ikm": ikm.hex(), "ma": ma.hex(), "mb": mb.hex(),
                           "qkd_binding": binding.hex(), "context": context.hex(), "kdf_context_hash": info.hex()},
            "psk": psk.hex()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_spec_reproduces_the_case(case: dict[str, Any]) -> None:
    mine = spec_case(case)
    assert {k: case[k] for k in mine} == mine


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_layout(case: dict[str, Any]) -> None:
    """Spec 12.3's lengths: 27 + 16 (n + m) body bytes, then 16 tag bytes; printable, unpadded."""
    text = case["identity"].encode("ascii")
    n, m = len(case["qkd_key_ids"]), len(case["announced_key_ids"])
    raw_len = 16 + 4 + 1 + 1 + 16 * n + 1 + 16 * m + 16
    assert len(text) == 7 + (4 * raw_len + 2) // 3
    assert text.startswith(b"hk1-ss.") and set(text[7:]) <= set(B64URL)
    assert len(h(case, "body")) == raw_len - 16


# --- refusals -------------------------------------------------------------------------------------


def _refused(case: dict[str, Any], text: bytes) -> str | None:
    """Why the server refuses ``text`` ("parse", "parent" or "tag", spec 12.6's order); None: accepted."""
    parsed = parse_identity(text)
    if parsed is None:
        return "parse"
    content, body, tag = parsed
    if content.handle != h(case, "handle"):
        return "parent"  # names no parent this server holds (the case's parent is the only one)
    suite = get_suite(case["suite"])
    return None if check_tag(h(case, "auth_key"), suite, body, tag) else "tag"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_single_byte_change_is_refused(case: dict[str, Any]) -> None:
    text = case["identity"].encode("ascii")
    assert _refused(case, text) is None
    how = dict.fromkeys(("parse", "parent", "tag"), 0)
    for i in range(len(text)):
        for b in range(256):
            if b == text[i]:
                continue
            why = _refused(case, text[:i] + bytes([b]) + text[i + 1:])
            assert why is not None, (i, b)
            how[why] += 1
    # Every defence is exercised: prefix and alphabet changes fail to parse; a well-formed change
    # (another base64url character) decodes to another handle, or to other bytes that fail the tag.
    assert all(how.values()), how


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_malformed_identities_do_not_parse(case: dict[str, Any]) -> None:
    text = case["identity"].encode("ascii")
    raw = h(case, "body") + h(case, "tag")
    suite = get_suite(case["suite"])
    a = h(case, "auth_key")
    bad = [
        text[:-1], text + b"A", text + b"=", b" " + text, text + b"\n",  # truncated, extended, padded, spaces
        b"hk1-rc." + text[7:], b"hk2-ss." + text[7:], b"HK1-SS." + text[7:],  # another kind or version
        text[:7] + b"+" + text[8:], text[:7] + b"/" + text[8:],  # base64's alphabet, not base64url's
        raw,  # the raw bytes, without the text form
    ]
    for item in bad:
        assert parse_identity(item) is None, item

    def tagged(body: bytes) -> bytes:  # a body a holder of A would tag: the parser alone refuses it
        return b"hk1-ss." + b64url(body + identity_tag(a, suite, body))

    body = h(case, "body")
    head = body[:16]
    n, m = len(case["qkd_key_ids"]), len(case["announced_key_ids"])
    assert parse_identity(tagged(body)) is not None
    assert parse_identity(tagged(head + u32(0) + body[20:])) is None  # counter 0
    assert parse_identity(tagged(body[:20] + u8(body[20] | 0x02) + body[21:])) is None  # an unknown flag
    assert parse_identity(tagged(body + b"\x00")) is None  # a trailing byte
    assert parse_identity(tagged(body[:-1])) is None  # a short key ID or count
    count = 21 + 1 + 16 * n
    assert parse_identity(tagged(body[:count] + u8(m + 1) + body[count + 1:])) is None  # m says one more
    too_many = head + body[16:21] + u8(MAX_USED + 1) + bytes(16 * (MAX_USED + 1)) + u8(0)
    assert parse_identity(tagged(too_many)) is None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tag_mismatch(case: dict[str, Any]) -> None:
    suite = get_suite(case["suite"])
    # A suite with the same hash, so only the label differs.
    other = get_suite("x25519-mlkem768-hkdfsha256" if suite.hash == "sha256" else "x25519-mlkem1024-hkdfsha384")
    a, body, tag = h(case, "auth_key"), h(case, "body"), h(case, "tag")
    assert check_tag(a, suite, body, tag)
    for bit in range(8 * len(tag)):
        flipped = bytearray(tag)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not check_tag(a, suite, body, bytes(flipped))
    wrong_a = bytearray(a)
    wrong_a[0] ^= 1
    assert not check_tag(bytes(wrong_a), suite, body, tag)  # another parent's key
    assert not check_tag(a, other, body, tag)  # the suite is in the tag's label
    assert not check_tag(a, suite, body[:16] + u32(case["counter"] ^ 1) + body[20:], tag)  # another counter
