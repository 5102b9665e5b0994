"""Authentication: precise local reasons, an opaque answer to the peer, and every PKI check."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkex.exceptions import AuthenticationError, ConfigurationError, PolicyViolation
from hybridkex.protocol import (
    AuthMode,
    InitiatorConfig,
    MACAuthenticator,
    PKIAuthenticator,
    PSKAuthenticator,
    ResponderConfig,
    SigningCredential,
)
from hybridkex.protocol.auth import verify_chain

from .helpers import CA, INI_ID, NOW_DT, PSK, RES_ID, ca, configs, credential, run_pair


def _assert_opaque(exc: BaseException | None) -> None:
    assert isinstance(exc, AuthenticationError)
    assert str(exc) == "authentication failed"


def _with_res_auth(res: ResponderConfig, auth) -> ResponderConfig:
    return replace(res, authenticators=(auth,))


def _with_ini_auth(ini: InitiatorConfig, auth) -> InitiatorConfig:
    return replace(ini, authenticators=(auth,))


# --- PSK -------------------------------------------------------------------------------------------


def test_wrong_psk(qkd):
    ini, res = configs()
    out = run_pair(ini, _with_res_auth(res, PSKAuthenticator({INI_ID: b"\x01" * 32})), qkd)
    _assert_opaque(out.ini_error)
    assert "does not verify" in out.ini_error.detail and RES_ID in out.ini_error.detail
    _assert_opaque(out.res_error)  # the peer's abort says nothing more
    assert out.res_error.detail == "the peer reported that authentication or key confirmation failed"
    assert PSK.hex() not in out.ini_error.detail


def test_unknown_identity_is_refused_before_qkd_keys_are_spent(qkd):
    ini, res = configs()
    out = run_pair(ini, _with_res_auth(res, PSKAuthenticator({"someone.else": PSK})), qkd)
    _assert_opaque(out.res_error)
    assert out.res_error.detail == f"unknown identity {INI_ID!r}: no PSK configured for it"
    _assert_opaque(out.ini_error)
    assert qkd.res.kme_takes == 0


def test_responder_identity_mismatch(qkd):
    ini, res = configs(peer_identity="other.example")
    out = run_pair(ini, res, qkd)
    _assert_opaque(out.ini_error)
    assert "identity mismatch" in out.ini_error.detail


def test_psk_too_short():
    with pytest.raises(ConfigurationError, match="at least 32 bytes"):
        PSKAuthenticator({"a": b"short"})
    assert "redacted" in repr(PSKAuthenticator({"a": PSK})) and PSK.hex() not in repr(PSKAuthenticator({"a": PSK}))


def test_no_common_auth_mode(qkd):
    ini, res = configs(ini_auth="psk", res_auth="pki-ed25519")
    out = run_pair(ini, res, qkd)
    assert isinstance(out.res_error, PolicyViolation) and out.res_error.violations == ("auth_mode",)


def test_the_responder_picks_its_preferred_common_mode(qkd):
    ini, res = configs()
    ini = _with_ini_auth(ini, PSKAuthenticator({RES_ID: PSK}))
    ini = replace(ini, authenticators=(ini.authenticators[0], configs(auth="pki-mldsa65")[0].authenticators[0]))
    res = replace(res, authenticators=(configs(auth="pki-mldsa65")[1].authenticators[0],
                                       PSKAuthenticator({INI_ID: PSK})))
    out = run_pair(ini, res, qkd)
    assert out.ok and out.res_session.info.auth_mode == "pki-mldsa65"


class _StaticRecycled(MACAuthenticator):
    """Stand-in for the [recycle] authenticator: a MAC under a key from an earlier handshake."""

    def __init__(self, keys):
        self._keys = keys

    @property
    def mode(self):
        return AuthMode.RECYCLED

    def pair_key(self, peer_identity):
        try:
            return self._keys[peer_identity]
        except KeyError:
            raise AuthenticationError(f"no recycled key for {peer_identity!r}") from None


def test_recycled_mode_slot(qkd):
    """The Authenticator interface carries a recycled mode with no change to the core."""
    first = run_pair(*configs(), qkd)
    key = first.ini_session.next_auth_key()
    assert key == first.res_session.next_auth_key()
    ini, res = configs()
    ini = replace(ini, authenticators=(_StaticRecycled({RES_ID: key}), *ini.authenticators))
    res = replace(res, authenticators=(_StaticRecycled({INI_ID: key}), *res.authenticators))
    second = run_pair(ini, res, qkd)
    assert second.ok and second.ini_session.info.auth_mode == "recycled"
    # A stale key fails like a wrong PSK.
    stale = replace(res, authenticators=(_StaticRecycled({INI_ID: bytes(32)}),))
    out = run_pair(ini, stale, qkd)
    _assert_opaque(out.ini_error)


# --- PKI -------------------------------------------------------------------------------------------


def _pki_out(qkd, cred, alg="ed25519", anchors=None):
    """The responder presents ``cred``; the initiator trusts ``anchors`` (default: the test CA)."""
    ini, res = configs(auth=f"pki-{alg}")
    res = _with_res_auth(res, PKIAuthenticator([ca(alg).cert], **{alg: cred}))
    ini = _with_ini_auth(ini, PKIAuthenticator(anchors or [ca(alg).cert],
                                               **{alg: credential(alg, INI_ID, "initiator")}))
    return run_pair(ini, res, qkd)


def test_untrusted_certificate(qkd):
    other = CA.create("ed25519", "another CA")
    out = _pki_out(qkd, other.credential(RES_ID, "responder"))
    _assert_opaque(out.ini_error)
    assert "untrusted" in out.ini_error.detail


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"not_after": NOW_DT - dt.timedelta(seconds=1)}, "expired"),
    ({"not_before": NOW_DT + dt.timedelta(days=1)}, "not valid yet"),
    ({"san": ["other.example"]}, "identity mismatch"),
    ({"ca": True}, "is a CA certificate"),
])
def test_leaf_certificate_checks(kwargs, reason, qkd):
    out = _pki_out(qkd, ca("ed25519").credential(RES_ID, "responder", **kwargs))
    _assert_opaque(out.ini_error)
    assert reason in out.ini_error.detail
    _assert_opaque(out.res_error)


def test_wrong_extended_key_usage(qkd):
    out = _pki_out(qkd, ca("ed25519").credential(RES_ID, "initiator"))  # a client certificate
    _assert_opaque(out.ini_error)
    assert "extended key usage" in out.ini_error.detail


def test_expired_ca(qkd):
    old = CA.create("ed25519", "old CA", not_after=NOW_DT - dt.timedelta(days=1),
                    not_before=NOW_DT - dt.timedelta(days=100))
    out = _pki_out(qkd, old.credential(RES_ID, "responder", not_before=NOW_DT - dt.timedelta(days=50)),
                   anchors=[old.cert])
    _assert_opaque(out.ini_error)
    assert "trust anchor expired" in out.ini_error.detail


def test_intermediate_ca_chain(qkd):
    inter = CA.create("mldsa65", "intermediate", issuer=ca("mldsa65"))
    cred = inter.credential(RES_ID, "responder", chain_extra=(inter.cert,))
    out = _pki_out(qkd, cred, alg="mldsa65")
    assert out.ok, out.ini_error and out.ini_error.detail
    # Without the intermediate in the chain the path is broken.
    leaf_only = SigningCredential(cred.chain[:1], cred.private_key)
    out = _pki_out(qkd, leaf_only, alg="mldsa65")
    _assert_opaque(out.ini_error)
    assert "untrusted" in out.ini_error.detail


def test_path_length_constraint(qkd):
    root = CA.create("ed25519", "root pl0", path_length=0)
    inter = CA.create("ed25519", "intermediate under pl0", issuer=root)
    cred = inter.credential(RES_ID, "responder", chain_extra=(inter.cert,))
    out = _pki_out(qkd, cred, anchors=[root.cert])
    _assert_opaque(out.ini_error)
    assert "path length" in out.ini_error.detail


def test_mixed_algorithm_chain_is_refused(qkd):
    """An ML-DSA key certified by an Ed25519 CA would fall with Ed25519: refused."""
    cert, key = ca("ed25519").issue(RES_ID, "responder", key_alg="mldsa65")
    out = _pki_out(qkd, SigningCredential((cert,), key), alg="mldsa65",
                   anchors=[ca("mldsa65").cert, ca("ed25519").cert])
    _assert_opaque(out.ini_error)
    assert "not MLDSA65" in out.ini_error.detail


@pytest.mark.parametrize("broken", ["ed25519", "mldsa65"])
def test_hybrid_needs_both_algorithms(broken, qkd):
    """An attacker who breaks one algorithm (modelled: controls a CA of it that we do not trust)
    still cannot authenticate in hybrid mode."""
    rogue = CA.create(broken, f"rogue {broken}")
    good = "mldsa65" if broken == "ed25519" else "ed25519"
    creds = {broken: rogue.credential(RES_ID, "responder"), good: credential(good, RES_ID, "responder")}
    ini, res = configs(auth="pki-hybrid")
    res = _with_res_auth(res, PKIAuthenticator([ca("ed25519").cert, ca("mldsa65").cert], **creds))
    out = run_pair(ini, res, qkd)
    _assert_opaque(out.ini_error)
    assert "untrusted" in out.ini_error.detail


def test_allowed_peers(qkd):
    ini, res = configs(auth="pki-ed25519")
    res = _with_res_auth(res, PKIAuthenticator([ca("ed25519").cert], ed25519=credential("ed25519", RES_ID,
                                                                                          "responder"),
                                               allowed_peers={"someone.else"}))
    out = run_pair(ini, res, qkd)
    _assert_opaque(out.res_error)
    assert "not in the allowed peers" in out.res_error.detail


def test_unknown_critical_extension(qkd):
    c = ca("ed25519")
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, RES_ID)]))
            .issuer_name(c.cert.subject).public_key(key.public_key()).serial_number(99)
            .not_valid_before(NOW_DT - dt.timedelta(days=1)).not_valid_after(NOW_DT + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(RES_ID)]), critical=False)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
                           critical=True)
            .sign(c.key, None))
    out = _pki_out(qkd, SigningCredential((cert,), key))
    _assert_opaque(out.ini_error)
    assert "unsupported critical extension" in out.ini_error.detail


def test_pki_configuration_errors():
    cred = credential("ed25519", RES_ID, "responder")
    with pytest.raises(ConfigurationError, match="no ED25519 trust anchor"):
        PKIAuthenticator([ca("mldsa65").cert], ed25519=cred)
    with pytest.raises(ConfigurationError, match="does not match"):
        SigningCredential(cred.chain, credential("ed25519", INI_ID, "initiator").private_key)
    with pytest.raises(ConfigurationError, match="needs an Ed25519 or ML-DSA-65"):
        PKIAuthenticator([ca("ed25519").cert])
    with pytest.raises(ConfigurationError, match="expected responder identity"):
        InitiatorConfig(INI_ID, (PKIAuthenticator([ca("ed25519").cert], ed25519=cred),),
                        configs()[0].policy, configs()[0].qkd)
    assert "private" not in repr(cred).lower()


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255),
       alg=st.sampled_from(["ed25519", "mldsa65"]))
def test_mutated_certificates_only_ever_fail_authentication(position, value, alg):
    """Whatever a single changed byte does to the DER, path validation fails closed with
    AuthenticationError (never another exception, never success)."""
    from hybridkex.protocol._wire import CertificateChain, SignatureAlgorithm

    cred = credential(alg, RES_ID, "responder")
    der = bytearray(cred.chain[0].public_bytes(serialization.Encoding.DER))
    i = position % len(der)
    if der[i] == value:
        value ^= 0x01
    der[i] = value
    algorithm = SignatureAlgorithm.ED25519 if alg == "ed25519" else SignatureAlgorithm.MLDSA65
    with pytest.raises(AuthenticationError):
        verify_chain(CertificateChain(algorithm, (bytes(der),)), [ca(alg).cert], now=NOW_DT, identity=RES_ID,
                     role="responder")


def test_valid_chain_passes_verify_chain():
    from hybridkex.protocol._wire import CertificateChain, SignatureAlgorithm

    cred = credential("ed25519", RES_ID, "responder")
    der = cred.chain[0].public_bytes(serialization.Encoding.DER)
    key = verify_chain(CertificateChain(SignatureAlgorithm.ED25519, (der,)), [ca("ed25519").cert], now=NOW_DT,
                       identity=RES_ID, role="responder")
    assert key == cred.private_key.public_key()


@pytest.mark.parametrize("alg", ["ed25519", "mldsa65"])
def test_non_canonical_signature_bit_string_is_refused(alg):
    """Regression (found by the hypothesis test above): a non-zero 'unused bits' octet in the
    signature BIT STRING is outside the signed data and was tolerated by the parser, so the same
    certificate had several accepted encodings.  Every leaf byte position is now checked."""
    from hybridkex.protocol._wire import CertificateChain, SignatureAlgorithm

    cred = credential(alg, RES_ID, "responder")
    base = cred.chain[0].public_bytes(serialization.Encoding.DER)
    algorithm = SignatureAlgorithm.ED25519 if alg == "ed25519" else SignatureAlgorithm.MLDSA65
    unused_bits_at = len(base) - len(cred.chain[0].signature) - 1
    assert base[unused_bits_at] == 0
    for i in range(len(base)) if alg == "ed25519" else [unused_bits_at]:
        der = bytearray(base)
        der[i] ^= 0x01
        with pytest.raises(AuthenticationError):
            verify_chain(CertificateChain(algorithm, (bytes(der),)), [ca(alg).cert], now=NOW_DT, identity=RES_ID,
                         role="responder")
