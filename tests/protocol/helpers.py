"""Test helpers for the handshake: deterministic randomness, configs, a small PKI, and an in-memory
:class:`ConnectionPair` that runs an Initiator against a Responder (after h11's tests/helpers.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hybridkex.exceptions import HybridKEXError, KeySourceError
from hybridkex.io import QKDKeyManager
from hybridkex.policy import KeyBudget, Policy, QKDConfig
from hybridkex.protocol import (
    NEED_DATA,
    PAUSED,
    HandshakeComplete,
    Initiator,
    InitiatorConfig,
    PKIAuthenticator,
    PSKAuthenticator,
    QKDKeysByIdRequired,
    QKDKeysRequired,
    Responder,
    ResponderConfig,
    Session,
    SigningCredential,
)
from hybridkex.qkd import MemoryKeyLink, QKDKey

#: A fixed "now" (2027-01-15) so certificate validity never depends on the wall clock.
NOW = 1_800_000_000.0
NOW_DT = dt.datetime.fromtimestamp(NOW, tz=dt.UTC)

INI_ID = "client.example"
RES_ID = "server.example"
INI_SAE = "sae-client"
RES_SAE = "sae-server"
PSK = bytes(range(32))


def clock() -> float:
    return NOW


class DeterministicRandom:
    """A reproducible byte source (SHAKE-256 in counter mode) for injecting into the core."""

    def __init__(self, seed: int | bytes = 0) -> None:
        self._seed = seed if isinstance(seed, bytes) else seed.to_bytes(8, "big")
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        self._counter += 1
        return hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big")).digest(n)


# --- a tiny PKI ------------------------------------------------------------------------------------

SigningKey = ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey


def _new_key(alg: str) -> SigningKey:
    return ed25519.Ed25519PrivateKey.generate() if alg == "ed25519" else mldsa.MLDSA65PrivateKey.generate()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class CA:
    """A certificate authority of one algorithm."""

    alg: str
    key: SigningKey
    cert: x509.Certificate

    @classmethod
    def create(cls, alg: str, name: str | None = None, *, not_before: dt.datetime | None = None,
               not_after: dt.datetime | None = None, issuer: CA | None = None, path_length: int | None = None) -> CA:
        key = _new_key(alg)
        subject = _name(name or f"hybridkex test {alg} CA")
        nb = not_before or NOW_DT - dt.timedelta(days=30)
        na = not_after or NOW_DT + dt.timedelta(days=3650)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.cert.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        )
        cert = builder.sign((issuer.key if issuer else key), None)
        return cls(alg, key, cert)

    def issue(self, identity: str, role: str, *, not_before: dt.datetime | None = None,
              not_after: dt.datetime | None = None, key_alg: str | None = None, ca: bool = False,
              san: Iterable[str] | None = None) -> tuple[x509.Certificate, SigningKey]:
        key = _new_key(key_alg or self.alg)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "responder" else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(identity))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW_DT - dt.timedelta(days=1))
            .not_valid_after(not_after or NOW_DT + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in (san or [identity])]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(self.key, None)
        )
        return cert, key

    def credential(self, identity: str, role: str, *, chain_extra: tuple[x509.Certificate, ...] = (),
                   **kwargs: Any) -> SigningCredential:
        cert, key = self.issue(identity, role, **kwargs)
        return SigningCredential((cert, *chain_extra), key)


_CAS: dict[str, CA] = {}


def ca(alg: str) -> CA:
    """The shared test CA of ``alg`` (created once per process: ML-DSA keys are slow-ish)."""
    if alg not in _CAS:
        _CAS[alg] = CA.create(alg)
    return _CAS[alg]


_CREDS: dict[tuple[str, str, str], SigningCredential] = {}


def credential(alg: str, identity: str, role: str) -> SigningCredential:
    key = (alg, identity, role)
    if key not in _CREDS:
        _CREDS[key] = ca(alg).credential(identity, role)
    return _CREDS[key]


def pki_authenticator(mode: str, identity: str, role: str, **kwargs: Any) -> PKIAuthenticator:
    """``mode`` is ``"ed25519"``, ``"mldsa65"`` or ``"hybrid"``."""
    algs = ("ed25519", "mldsa65") if mode == "hybrid" else (mode,)
    creds = {a: credential(a, identity, role) for a in algs}
    return PKIAuthenticator([ca(a).cert for a in algs], ed25519=creds.get("ed25519"),
                            mldsa65=creds.get("mldsa65"), **kwargs)


# --- configurations --------------------------------------------------------------------------------


def authenticators(auth: str, role: str) -> tuple[Any, ...]:
    me, peer = (INI_ID, RES_ID) if role == "initiator" else (RES_ID, INI_ID)
    if auth == "psk":
        return (PSKAuthenticator({peer: PSK}),)
    return (pki_authenticator(auth.removeprefix("pki-"), me, role),)


def configs(*, auth: str = "psk", suites: tuple[str, ...] = (), qkd: str = "required", master: str = "responder",
            budget: KeyBudget | None = None, res_suites: tuple[str, ...] | None = None, res_qkd: str | None = None,
            ini_budget: KeyBudget | None = None, key_size_bits: int = 256,
            ini_auth: str | None = None, res_auth: str | None = None,
            peer_identity: str | None = RES_ID) -> tuple[InitiatorConfig, ResponderConfig]:
    """A matching initiator/responder pair of configurations."""
    budget = budget or KeyBudget()

    def pol(s: tuple[str, ...], q: str, b: KeyBudget) -> Policy:
        return Policy(suites=s, qkd=q, key_budget=b)  # type: ignore[arg-type]

    ini_q = QKDConfig(INI_SAE, "kme-client", master=master, key_size_bits=key_size_bits,  # type: ignore[arg-type]
                      peer_sae_id=RES_SAE if master == "initiator" else None) if qkd != "disabled" else None
    rq = res_qkd or qkd
    res_q = QKDConfig(RES_SAE, "kme-server", master=master,  # type: ignore[arg-type]
                      key_size_bits=key_size_bits) if rq != "disabled" else None
    ini = InitiatorConfig(INI_ID, authenticators(ini_auth or auth, "initiator"),
                          pol(suites, qkd, ini_budget or budget), ini_q, peer_identity=peer_identity)
    res = ResponderConfig(RES_ID, authenticators(res_auth or auth, "responder"),
                          pol(res_suites if res_suites is not None else suites, rq, budget), res_q)
    return ini, res


@dataclass
class QKDPair:
    """An in-memory QKD link and one key manager per side."""

    link: MemoryKeyLink
    ini: QKDKeyManager
    res: QKDKeyManager

    @classmethod
    def create(cls, budget: KeyBudget | None = None, *, ini_budget: KeyBudget | None = None,
               clock: Callable[[], float] | None = None, **link_kwargs: Any) -> QKDPair:
        link = MemoryKeyLink(("kme-client", "kme-server"), **link_kwargs)
        kw = {"clock": clock} if clock else {}
        return cls(link, QKDKeyManager(link.source(INI_SAE, 0), ini_budget or budget, **kw),
                   QKDKeyManager(link.source(RES_SAE, 1), budget, **kw))


# --- running a pair in memory ----------------------------------------------------------------------

Answer = Callable[[QKDKeysRequired | QKDKeysByIdRequired], list[QKDKey]]


def split_frames(data: bytes) -> list[bytes]:
    """Split our own (trusted) output into frames."""
    out = []
    while data:
        (length,) = struct.unpack(">I", data[4:8])
        out.append(data[: 8 + length])
        data = data[8 + length:]
    return out


@dataclass
class Outcome:
    """What happened to each side."""

    ini_session: Session | None = None
    res_session: Session | None = None
    ini_error: BaseException | None = None
    res_error: BaseException | None = None
    #: Every frame in the order it was sent: (sender, bytes as sent, before tampering).
    frames: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ini_session is not None and self.res_session is not None


class ConnectionPair:
    """Runs an Initiator and a Responder against each other in memory.

    ``tamper(index, sender, frame) -> bytes`` may rewrite frame number ``index`` in transit;
    ``chunks(data) -> list[bytes]`` splits each delivery (e.g. one byte at a time);
    ``close_after`` delivers EOF to the receiver after frame ``index``.
    """

    def __init__(self, ini: Initiator, res: Responder, ini_keys: Answer | None = None,
                 res_keys: Answer | None = None) -> None:
        self.ini, self.res = ini, res
        self.keys = {"initiator": ini_keys, "responder": res_keys}

    @classmethod
    def create(cls, ini_cfg: InitiatorConfig, res_cfg: ResponderConfig, qkd: QKDPair | None = None, *,
               seed: int = 1, ini_keys: Answer | None = None, res_keys: Answer | None = None) -> ConnectionPair:
        ini = Initiator(ini_cfg, randbytes=DeterministicRandom(seed), clock=clock)
        res = Responder(res_cfg, randbytes=DeterministicRandom(seed + 1000), clock=clock)
        return cls(ini, res, ini_keys or (qkd.ini.answer if qkd else None),
                   res_keys or (qkd.res.answer if qkd else None))

    def run(self, *, tamper: Callable[[int, str, bytes], bytes] | None = None,
            chunks: Callable[[bytes], list[bytes]] | None = None, close_after: int | None = None,
            max_rounds: int = 50) -> Outcome:
        out = Outcome()
        sides: dict[str, Initiator | Responder] = {"initiator": self.ini, "responder": self.res}
        inbox: dict[str, list[bytes]] = {"initiator": [], "responder": []}
        eof: dict[str, bool] = {"initiator": False, "responder": False}
        done = {"initiator": False, "responder": False}

        def record_error(name: str, exc: BaseException) -> None:
            done[name] = True
            if name == "initiator" and out.ini_error is None:
                out.ini_error = exc
            if name == "responder" and out.res_error is None:
                out.res_error = exc

        def collect(name: str) -> None:
            other = "responder" if name == "initiator" else "initiator"
            data = sides[name].data_to_send()
            if not data:
                return
            delivered = b""
            for frame in split_frames(data):
                index = len(out.frames)
                out.frames.append((name, frame))
                if tamper is not None:
                    frame = tamper(index, name, frame)
                delivered += frame
                if close_after == index:
                    inbox[other].extend(chunks(delivered) if chunks else [delivered])
                    eof[other] = True
                    return
            inbox[other].extend(chunks(delivered) if chunks else [delivered])

        def pump(name: str) -> None:
            side = sides[name]
            for _ in range(100):
                if done[name]:
                    break
                try:
                    event = side.next_event()
                except HybridKEXError as exc:
                    record_error(name, exc)
                    break
                if event is NEED_DATA or event is PAUSED:
                    break
                if isinstance(event, QKDKeysRequired | QKDKeysByIdRequired):
                    answer = self.keys[name]
                    try:
                        if answer is None:
                            raise KeySourceError("no key source in this test")
                        keys = answer(event)
                    except KeySourceError as exc:
                        try:
                            side.qkd_unavailable(exc)
                        except HybridKEXError as err:
                            record_error(name, err)
                        continue
                    try:
                        side.provide_qkd_keys(keys)
                    except HybridKEXError as err:
                        record_error(name, err)
                elif isinstance(event, HandshakeComplete):
                    done[name] = True
                    if name == "initiator":
                        out.ini_session = event.session
                    else:
                        out.res_session = event.session
            collect(name)

        stalled = False
        pump("initiator")
        for _ in range(max_rounds):
            progress = False
            for name in ("responder", "initiator"):
                if done[name]:
                    inbox[name].clear()
                    continue
                if inbox[name] or eof[name]:
                    chunks_in, inbox[name] = inbox[name], []
                    for chunk in chunks_in:  # process after every chunk, as a socket loop would
                        if done[name]:
                            break
                        try:
                            sides[name].receive_data(chunk)
                        except HybridKEXError as exc:
                            record_error(name, exc)
                            break
                        pump(name)
                    if eof[name] and not done[name]:
                        eof[name] = False
                        try:
                            sides[name].receive_data(b"")
                        except HybridKEXError as exc:
                            record_error(name, exc)
                        pump(name)
                    progress = True
            if not progress:
                if not stalled and not all(done.values()):
                    # Nobody can move (e.g. a length field promises more bytes than will come): a real
                    # transport times out and closes; deliver EOF to whoever is still waiting.
                    stalled = True
                    for name, finished in done.items():
                        eof[name] = not finished
                    continue
                break
        return out


def run_pair(ini_cfg: InitiatorConfig, res_cfg: ResponderConfig, qkd: QKDPair | None = None, **kwargs: Any) -> Outcome:
    return ConnectionPair.create(ini_cfg, res_cfg, qkd, **{k: v for k, v in kwargs.items()
                                                           if k in ("seed", "ini_keys", "res_keys")}).run(
        **{k: v for k, v in kwargs.items() if k in ("tamper", "chunks", "close_after")})
