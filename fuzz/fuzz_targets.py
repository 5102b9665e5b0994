"""Fuzz targets for every decoder of hybridkex that reads bytes an attacker (or a user) controls.

Each target is a function ``target(data: bytes) -> None`` with one contract: whatever ``data`` is,
it returns normally or the code under test raises a :class:`hybridkex.HybridKEXError` subclass,
which the target swallows.  Any other exception escaping a target (``IndexError``, ``KeyError``,
``struct.error``, ``UnicodeError``, ``TypeError``, ``RecursionError``, a failed property check
raised as :class:`FuzzFinding`...) is a finding.

The same targets are driven two ways:

* coverage-guided by atheris/libFuzzer (``python fuzz/fuzz.py TARGET ...``, see fuzz/README.md);
* by hypothesis in the pytest run (tests/hardening/test_hardening_fuzz.py), bounded, in CI.

:func:`seeds` builds a seed corpus per target from real protocol runs (an in-memory handshake
with deterministic randomness, a real TLS ClientHello, real KME JSON answers, valid tunnel
configuration files), so mutations start from inputs that reach deep into the parsers.

Targets (``TARGETS``):

``wire``        frame header + every message body decoder of hybridkex/protocol/_wire.py; a
                body that decodes must re-encode to the same bytes (canonical encoding).
``responder``   a Responder fed the bytes (optionally in chunks) through receive_data/next_event,
                QKD requests answered; it must never complete (the input cannot hold a valid
                PSK proof).
``initiator``   an Initiator (deterministic randomness) fed the bytes as the responder's flight;
                it may complete only when the input starts with the honest responder flight
                recorded for the same randomness: no key ever comes out of tampered input.
``tunnel_config``  hybridkex/tunnel/config.py load_config() on the bytes as a TOML file.
``kme_json``    the ETSI GS QKD 014 client's answer handling (status code, content type, strict
                JSON) and validation of Status, Key container (enc_keys / dec_keys) and Error.
``tls_sniff``   the reconnect demux helpers tls_record_length() and client_hello_cipher().
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import ssl
import tempfile
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from hybridkex.exceptions import HybridKEXError
from hybridkex.io.reconnect import client_hello_cipher, tls_record_length
from hybridkex.policy import Policy, QKDConfig
from hybridkex.protocol import (
    NEED_DATA,
    PAUSED,
    HandshakeComplete,
    Initiator,
    InitiatorConfig,
    PSKAuthenticator,
    QKDKeysByIdRequired,
    QKDKeysRequired,
    Responder,
    ResponderConfig,
    State,
)
from hybridkex.protocol import _wire as w
from hybridkex.qkd import ETSI014Client
from hybridkex.qkd._retry import Answer, interpret
from hybridkex.qkd.base import QKDKey
from hybridkex.qkd.etsi014 import parse_key_container, parse_status
from hybridkex.tunnel.config import load_config

__all__ = ["TARGETS", "FuzzFinding", "seeds"]


class FuzzFinding(Exception):
    """A property of a target does not hold (e.g. a key came out of a tampered handshake)."""


INI_ID = "client.example"
RES_ID = "server.example"
#: The PSK of the fuzzing configurations; an input can only complete a handshake by replaying the
#: recorded honest flight, never by knowing it.
PSK = hashlib.sha256(b"hybridkex fuzzing psk").digest()
NOW = 1_800_000_000.0


def _clock() -> float:
    return NOW


class _Rand:
    """SHAKE-256 in counter mode: the same seed gives the same nonces and ephemeral keys."""

    def __init__(self, seed: int) -> None:
        self._seed = seed.to_bytes(8, "big")
        self._n = 0

    def __call__(self, n: int) -> bytes:
        self._n += 1
        return hashlib.shake_256(self._seed + self._n.to_bytes(8, "big")).digest(n)


def _qkd_key(key_id: str) -> QKDKey:
    """The stand-in KME: a key ID always maps to the same key bytes on both sides."""
    return QKDKey(key_id, hashlib.sha256(b"hybridkex fuzz qkd " + key_id.encode()).digest())


def _answer(request: QKDKeysRequired | QKDKeysByIdRequired, counter: list[int]) -> list[QKDKey]:
    if isinstance(request, QKDKeysRequired):
        out = []
        for _ in range(request.number):
            counter[0] += 1
            kid = str(uuid.UUID(bytes=hashlib.sha256(counter[0].to_bytes(8, "big")).digest()[:16], version=4))
            out.append(QKDKey(kid, _qkd_key(kid).key[: request.size_bits // 8]))
        return out
    return [_qkd_key(k) for k in request.key_ids]


# The configurations a handshake target can be run with; the first input byte picks one.
#   (QKD policy of both sides, ETSI master, suites)
_PROFILES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("required", "responder", ()),
    ("required", "initiator", ()),
    ("optional", "responder", ()),
    ("disabled", "responder", ()),
    ("required", "responder", ("x25519-mlkem1024-qkd-hkdfsha384",)),
)


@cache
def _configs(profile: int) -> tuple[InitiatorConfig, ResponderConfig]:
    qkd, master, suites = _PROFILES[profile]
    policy = Policy(suites=suites, qkd=qkd)  # type: ignore[arg-type]
    ini_q = res_q = None
    if qkd != "disabled":
        ini_q = QKDConfig("sae-client", "kme-client", master=master,  # type: ignore[arg-type]
                          peer_sae_id="sae-server" if master == "initiator" else None)
        res_q = QKDConfig("sae-server", "kme-server", master=master)  # type: ignore[arg-type]
    ini = InitiatorConfig(INI_ID, (PSKAuthenticator({RES_ID: PSK}),), policy, ini_q, peer_identity=RES_ID)
    res = ResponderConfig(RES_ID, (PSKAuthenticator({INI_ID: PSK}),), policy, res_q)
    return ini, res


def _pump(conn: Initiator | Responder, counter: list[int], *, qkd_ok: bool = True) -> HandshakeComplete | None:
    """Run ``next_event`` until it needs data; answer QKD requests.  Returns the completion, if any.

    Every event must be one of the defined ones; every exception a HybridKEXError (the caller
    catches it)."""
    for _ in range(64):
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            return None
        if isinstance(event, QKDKeysRequired | QKDKeysByIdRequired):
            if qkd_ok:
                conn.provide_qkd_keys(_answer(event, counter))
            else:
                conn.qkd_unavailable("fuzzing: key source down")
            continue
        if isinstance(event, HandshakeComplete):
            return event
        raise FuzzFinding(f"next_event() returned an undefined value {event!r}")
    raise FuzzFinding("next_event() did not settle within 64 calls")


@cache
def honest_flights(profile: int) -> tuple[bytes, bytes]:
    """(initiator stream, responder stream) of one honest handshake of ``profile`` with the fixed
    randomness the targets use (seed 1 for the initiator, 2 for the responder)."""
    ini_cfg, res_cfg = _configs(profile)
    ini = Initiator(ini_cfg, randbytes=_Rand(1), clock=_clock)
    res = Responder(res_cfg, randbytes=_Rand(2), clock=_clock)
    counter = [0]
    ini_out, res_out = bytearray(), bytearray()
    done_i = done_r = None
    _pump(ini, counter)
    for _ in range(10):
        data = ini.data_to_send()
        ini_out += data
        if data and done_r is None:
            res.receive_data(data)
            done_r = _pump(res, counter) or done_r
        data = res.data_to_send()
        res_out += data
        if data and done_i is None:
            ini.receive_data(data)
            done_i = _pump(ini, counter) or done_i
        if done_i and done_r:
            ini_out += ini.data_to_send()
            break
    if not (done_i and done_r):
        raise RuntimeError(f"the honest handshake of profile {profile} did not complete")
    return bytes(ini_out), bytes(res_out)


# --- targets ---------------------------------------------------------------------------------------

_DECODERS: tuple[Callable[[bytes], Any], ...] = (
    w.HelloMsg.decode,
    w.ResponseMsg.decode,
    w.CertificateMsg.decode,
    lambda b: w.FinishedMsg.decode(b, 32),
    lambda b: w.FinishedMsg.decode(b, 48),
    w.decode_abort,
)


def target_wire(data: bytes) -> None:
    """Header check of the first 8 bytes; body decoder chosen by the first byte on the rest."""
    if len(data) >= w.HEADER_LEN:
        try:
            ftype, length = w.parse_header(data[: w.HEADER_LEN])
        except HybridKEXError:
            pass
        else:
            if length > w.MAX_BODY[ftype]:
                raise FuzzFinding("parse_header accepted a body above the maximum")
    if not data:
        return
    which = data[0] % len(_DECODERS)
    body = data[1:]
    try:
        msg = _DECODERS[which](body)
    except HybridKEXError:
        return
    if which < 5:  # every accepted body has exactly one encoding: no ignored or ambiguous bytes
        again = msg.encode()
        if again != body:
            raise FuzzFinding(f"decoder {which} accepted a body that re-encodes differently")


def _chunks(data: bytes, size: int) -> list[bytes]:
    if size == 0:
        return [data]
    return [data[i:i + size] for i in range(0, len(data), size)]


def target_responder(data: bytes) -> None:
    """byte 0: profile; byte 1: chunk size (0 = all at once; bit 7: QKD unavailable); rest: stream."""
    if len(data) < 2:
        return
    profile = data[0] % len(_PROFILES)
    chunk = data[1] & 0x7F
    qkd_ok = not data[1] & 0x80
    res = Responder(_configs(profile)[1], randbytes=_Rand(2), clock=_clock)
    counter = [1000]
    try:
        for piece in [*_chunks(data[2:], chunk), b""]:
            res.receive_data(piece)
            if _pump(res, counter, qkd_ok=qkd_ok) is not None:
                raise FuzzFinding("the responder completed a handshake from fuzzed input")
    except HybridKEXError:
        if res.state is not State.FAILED:
            raise FuzzFinding("a HybridKEXError left the responder in a non-failed state") from None
        if res.trailing_data:
            raise FuzzFinding("a failed responder hands on trailing data") from None


def target_initiator(data: bytes) -> None:
    """byte 0: profile; byte 1: chunk size (bit 7: QKD unavailable); rest: the responder's flight."""
    if len(data) < 2:
        return
    profile = data[0] % len(_PROFILES)
    chunk = data[1] & 0x7F
    qkd_ok = not data[1] & 0x80
    stream = data[2:]
    ini = Initiator(_configs(profile)[0], randbytes=_Rand(1), clock=_clock)
    counter = [0]
    try:
        _pump(ini, counter, qkd_ok=qkd_ok)
        ini.data_to_send()
        for piece in [*_chunks(stream, chunk), b""]:
            ini.receive_data(piece)
            if _pump(ini, counter, qkd_ok=qkd_ok) is not None:
                honest = honest_flights(profile)[1]
                # The honest flight ends with Finished_R; the initiator completes right after it.
                if not stream.startswith(honest) or (not qkd_ok and _configs(profile)[0].policy.uses_qkd):
                    raise FuzzFinding("the initiator completed a handshake on input other than the honest flight")
                return
    except HybridKEXError:
        if ini.state is not State.FAILED:
            raise FuzzFinding("a HybridKEXError left the initiator in a non-failed state") from None


_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="hybridkex-fuzz-config-"))
# The files the seed configurations name, so that validation gets past the file checks.
for _name in ("client-a.psk", "sae-s.crt", "sae-s.key", "kme-ca.crt", "peer.crt", "peer.key", "ca.crt"):
    (_CONFIG_DIR / _name).write_bytes(hashlib.sha256(_name.encode()).digest())
    (_CONFIG_DIR / _name).chmod(0o600)
(_CONFIG_DIR / "open.psk").write_bytes(b"x" * 32)
(_CONFIG_DIR / "open.psk").chmod(0o644)


def target_tunnel_config(data: bytes) -> None:
    """byte 0 (bit 0): role server/client; rest: the TOML file's bytes."""
    if not data:
        return
    role = "client" if data[0] & 1 else "server"
    path = _CONFIG_DIR / "fuzz.toml"
    path.write_bytes(data[1:])
    with contextlib.suppress(HybridKEXError):
        load_config(role, path)  # type: ignore[arg-type]


@cache
def _kme_client() -> Any:
    # Never connects: only the answer handling is exercised.
    return ETSI014Client("http://127.0.0.1:9", sae_id="sae-a", kme_id="kme-a", allow_insecure_http=True)


_STATUSES = (200, 200, 200, 200, 400, 401, 503, 500, 404, 302)
_CTYPES = ("application/json", "application/json; charset=utf-8", "text/html", "")


def target_kme_json(data: bytes) -> None:
    """byte 0: endpoint (bits 0-1), content type (bits 2-3), status (bits 4-7); rest: the body."""
    if not data:
        return
    endpoint = data[0] & 3
    ctype = _CTYPES[(data[0] >> 2) & 3]
    status = _STATUSES[(data[0] >> 4) % len(_STATUSES)]
    body = data[1:]
    client = _kme_client()
    where = "fuzz"
    try:
        obj = interpret(where, Answer(status, ctype, body, {"Retry-After": "1"}), client.sae_id)
        if status != 200:
            return
        if endpoint == 0:
            parse_status(obj, master_sae_id="sae-a", slave_sae_id="sae-b", where=where)
        elif endpoint == 1:
            keys = client._enc_keys_request("sae-b", 1, 256).finish(where, obj)
            if len(keys) != 1 or len(keys[0].key) != 32:
                raise FuzzFinding("enc_keys accepted a container with other than one 256-bit key")
        elif endpoint == 2:
            keys = parse_key_container(obj, number=2, size_bits=None, where=where)
            client._remember(client._issued, (k.key_id for k in keys), "issued")
        else:
            wanted = ["0f0e0d0c-0b0a-4908-8706-050403020100", "00112233-4455-4677-8899-aabbccddeeff"]
            keys = client._dec_keys_request("sae-a", wanted).finish(where, obj)
            if [k.key_id.lower() for k in keys] != wanted:
                raise FuzzFinding("dec_keys returned other key IDs than requested")
            client._fetched.clear()  # the same two IDs may come back in the next input
    except HybridKEXError:
        pass


def target_tls_sniff(data: bytes) -> None:
    """The first 5 bytes as a TLS record header, the rest as the record body (ClientHello)."""
    try:
        length = tls_record_length(data[:5])
        if not 4 <= length <= 16384 + 256:
            raise FuzzFinding("tls_record_length accepted an out-of-range length")
    except HybridKEXError:
        pass
    with contextlib.suppress(HybridKEXError):
        client_hello_cipher(data[5:])


TARGETS: dict[str, Callable[[bytes], None]] = {
    "wire": target_wire,
    "responder": target_responder,
    "initiator": target_initiator,
    "tunnel_config": target_tunnel_config,
    "kme_json": target_kme_json,
    "tls_sniff": target_tls_sniff,
}


# --- seeds -----------------------------------------------------------------------------------------


def _split_frames(stream: bytes) -> list[bytes]:
    out = []
    while len(stream) >= w.HEADER_LEN:
        n = int.from_bytes(stream[4:8], "big")
        out.append(stream[: w.HEADER_LEN + n])
        stream = stream[w.HEADER_LEN + n:]
    return out


def _type_index(frame: bytes) -> int:
    return {1: 0, 2: 1, 3: 2, 4: 3, 0x7F: 5}.get(frame[3], 0)


def _client_hello() -> bytes:
    """A real TLS 1.3 ClientHello record from the standard library's TLS client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="server.example")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


_SERVER_TOML = b"""listen = "127.0.0.1:8443"
target = "127.0.0.1:8080"
identity = "server.example"

[[peers]]
identity = "client-a"
mode = "psk"
psk_file = "client-a.psk"
sae_id = "SAE_A"

[kme]
url = "https://127.0.0.1:8443"
sae_id = "SAE_S"
cert = "sae-s.crt"
key = "sae-s.key"
ca = "kme-ca.crt"

[policy]
qkd = "optional"

[timeouts]
handshake = 5

[limits]
max_connections = 10
"""

_PKI_TOML = b"""listen = "[::1]:0"
target = "[2001:db8::1]:443"
identity = "spiffe://org/svc"

[[peers]]
identity = "client-a"
mode = "pki"
cert = "peer.crt"
key = "peer.key"
ca = "ca.crt"
sae_id = "SAE_A"

[[peers]]
identity = "client-b"
mode = "psk"
psk_file = "client-a.psk"

[policy]
qkd = "disabled"
suites = ["x25519-mlkem768-hkdfsha256"]
key_budget = "epoch"

[logging]
level = "debug"
format = "json"

[metrics]
listen = "127.0.0.1:9100"

[health]
enabled = true
"""

_CLIENT_TOML = b"""listen = "127.0.0.1:8080"
target = "tunnel.example:8443"
identity = "client-a"

[[peers]]
identity = "server.example"
mode = "psk"
psk_file = "client-a.psk"

[kme]
embedded = true
sae_id = "SAE_S"
"""


def _container(*ids: str) -> bytes:
    return json.dumps({"keys": [{"key_ID": k, "key": base64.b64encode(_qkd_key(k).key).decode()} for k in ids]
                       }).encode()


@cache
def seeds(name: str) -> tuple[bytes, ...]:
    """A small seed corpus for target ``name`` built from real runs."""
    out: list[bytes] = []
    if name in ("wire", "responder", "initiator"):
        for profile in range(len(_PROFILES)):
            ini_stream, res_stream = honest_flights(profile)
            if name == "wire":
                for frame in _split_frames(ini_stream) + _split_frames(res_stream):
                    out.append(bytes([_type_index(frame)]) + frame[w.HEADER_LEN:])
                    out.append(frame)
            elif name == "responder":
                out += [bytes([profile, 0]) + ini_stream, bytes([profile, 7]) + ini_stream[:-1],
                        bytes([profile, 0x80]) + ini_stream]
            else:
                out += [bytes([profile, 0]) + res_stream, bytes([profile, 13]) + res_stream,
                        bytes([profile, 0x80]) + res_stream]
    elif name == "tunnel_config":
        out += [b"\x00" + _SERVER_TOML, b"\x01" + _CLIENT_TOML, b"\x00" + _PKI_TOML, b"\x01" + _PKI_TOML,
                b"\x00" + _SERVER_TOML.replace(b"psk", b"pki"),
                b"\x01" + _PKI_TOML.replace(b"client-a.psk", b"open.psk")]
    elif name == "kme_json":
        status = {"source_KME_ID": "kme-a", "target_KME_ID": "kme-b", "master_SAE_ID": "sae-a",
                  "slave_SAE_ID": "sae-b", "key_size": 256, "stored_key_count": 5, "max_key_count": 10,
                  "max_key_per_request": 4, "max_key_size": 1024, "min_key_size": 64, "max_SAE_ID_count": 0}
        ids = ["0f0e0d0c-0b0a-4908-8706-050403020100", "00112233-4455-4677-8899-aabbccddeeff"]
        out += [b"\x00" + json.dumps(status).encode(), b"\x01" + _container(str(uuid.UUID(int=7, version=4))),
                b"\x02" + _container(*(str(uuid.UUID(int=i, version=4)) for i in (8, 9))),
                b"\x03" + _container(*ids), b"\x43" + json.dumps({"message": "Bad request format."}).encode(),
                b"\x63" + json.dumps({"message": "Error on server side.", "details": [{"x": 1}]}).encode()]
    elif name == "tls_sniff":
        out.append(_client_hello())
    else:
        raise KeyError(name)
    return tuple(out)


def write_corpus(name: str, directory: str | os.PathLike[str]) -> int:
    """Write the seeds of ``name`` into ``directory`` (for libFuzzer); returns how many."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    items = seeds(name)
    for item in items:
        (d / f"seed-{hashlib.sha1(item).hexdigest()}").write_bytes(item)  # noqa: S324 - a file name
    return len(items)
