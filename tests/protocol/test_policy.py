"""Policy and configuration objects: frozen, validated, with the field named in every error."""

from __future__ import annotations

import dataclasses

import pytest

from hybridkex.exceptions import ConfigurationError, UnsupportedAlgorithm
from hybridkex.policy import KeyBudget, Policy, QKDConfig, QKDMode, Timeouts
from hybridkex.protocol import Initiator, InitiatorConfig, PSKAuthenticator, Responder, ResponderConfig
from hybridkex.suites import get_suite

from .helpers import PSK, configs


def test_defaults():
    p = Policy()
    assert p.qkd is QKDMode.REQUIRED
    assert [s.name for s in p.allowed_suites] == ["x25519-mlkem768-qkd-hkdfsha256"]
    assert p.key_budget.mode == "fresh" and p.timeouts.handshake == 10.0 and p.timeouts.kme == 5.0
    assert [s.name for s in Policy(qkd="disabled").allowed_suites] == ["x25519-mlkem768-hkdfsha256"]


def test_optional_appends_the_no_qkd_siblings_last():
    p = Policy(suites=("x25519-mlkem768-qkd-hkdfsha256", "x25519-mlkem1024-qkd-hkdfsha384"), qkd="optional")
    assert [s.name for s in p.allowed_suites] == [
        "x25519-mlkem768-qkd-hkdfsha256", "x25519-mlkem1024-qkd-hkdfsha384",
        "x25519-mlkem768-hkdfsha256", "x25519-mlkem1024-hkdfsha384"]


@pytest.mark.parametrize(("kwargs", "field", "match"), [
    ({"suites": ("x25519-mlkem768-hkdfsha256",)}, "policy.suites", "QKD is required"),
    ({"suites": ("x25519-mlkem768-qkd-hkdfsha256",), "qkd": "disabled"}, "policy.suites", "QKD is disabled"),
    ({"suites": ("nope",)}, "suite", "unknown suite"),
    ({"suites": ("x25519-mlkem768-qkd-hkdfsha256",) * 2}, "policy.suites", "twice"),
    ({"qkd": "sometimes"}, "policy.qkd", "must be one of"),
    ({"key_budget": "epoch"}, "policy.key_budget", "KeyBudget"),
])
def test_policy_errors(kwargs, field, match):
    with pytest.raises(ConfigurationError, match=match) as err:
        Policy(**kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"mode": "sometimes"}, "key_budget.mode"),
    ({"mode": "epoch", "epoch_max_handshakes": None, "epoch_max_age": None}, "key_budget"),
    ({"epoch_max_handshakes": 0}, "key_budget.epoch_max_handshakes"),
    ({"epoch_max_handshakes": 1.5}, "key_budget.epoch_max_handshakes"),
    ({"epoch_max_age": float("inf")}, "key_budget.epoch_max_age"),
    ({"epoch_max_age": -1}, "key_budget.epoch_max_age"),
])
def test_key_budget_errors(kwargs, field):
    with pytest.raises(ConfigurationError) as err:
        KeyBudget(**kwargs)
    assert err.value.field == field


def test_timeouts_and_qkd_config_errors():
    with pytest.raises(ConfigurationError):
        Timeouts(handshake=0)
    with pytest.raises(ConfigurationError) as err:
        QKDConfig("", "kme")
    assert err.value.field == "qkd.sae_id"
    with pytest.raises(ConfigurationError) as err:
        QKDConfig("sae", "kme", master="both")  # type: ignore[arg-type]
    assert err.value.field == "qkd.master"
    with pytest.raises(ConfigurationError) as err:
        QKDConfig("sae", "kme", key_size_bits=100)
    assert err.value.field == "qkd.key_size_bits"


def test_configs_are_frozen():
    ini, res = configs()
    for obj in (ini, res, ini.policy, ini.policy.key_budget, ini.qkd, ini.policy.timeouts):
        name = dataclasses.fields(obj)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, "x")
    with pytest.raises(TypeError):
        res.peer_sae_ids["x"] = "y"  # type: ignore[index]


def test_side_config_errors():
    auth = PSKAuthenticator({"peer": PSK})
    with pytest.raises(ConfigurationError) as err:
        InitiatorConfig("me", (auth,), Policy())  # QKD required, no QKDConfig
    assert err.value.field == "qkd"
    with pytest.raises(ConfigurationError) as err:
        InitiatorConfig("me", (), Policy(qkd="disabled"))
    assert err.value.field == "authenticators"
    with pytest.raises(ConfigurationError) as err:
        InitiatorConfig("me", (auth, auth), Policy(qkd="disabled"))
    assert err.value.field == "authenticators"
    with pytest.raises(ConfigurationError) as err:
        InitiatorConfig("", (auth,), Policy(qkd="disabled"))
    assert err.value.field == "identity"
    with pytest.raises(ConfigurationError) as err:
        InitiatorConfig("me", (auth,), Policy(), QKDConfig("a", "b", master="initiator"))
    assert err.value.field == "qkd.peer_sae_id"
    with pytest.raises(ConfigurationError) as err:
        ResponderConfig("me", (auth,), Policy(qkd="disabled"), QKDConfig("a", "b"))
    assert err.value.field == "qkd"
    # A single authenticator is accepted and normalised to a tuple.
    cfg = ResponderConfig("me", auth, Policy(qkd="disabled"))  # type: ignore[arg-type]
    assert cfg.authenticators == (auth,)


def test_unavailable_suite_fails_at_construction(monkeypatch):
    """A liboqs suite without liboqs is a clear UnsupportedAlgorithm when the handshake object is
    built, never a failure in the middle of a handshake."""
    from hybridkex.hazmat import kem

    monkeypatch.setattr(kem, "oqs_library_path", lambda: None)
    monkeypatch.setattr(kem, "_cache", {})
    monkeypatch.setattr(kem, "_oqs_module", None)  # as if liboqs had never been loaded in this process
    ini, res = configs(suites=("x25519-hqc1-qkd-hkdfsha256",))
    with pytest.raises(UnsupportedAlgorithm, match="liboqs"):
        Initiator(ini)
    with pytest.raises(UnsupportedAlgorithm, match="liboqs"):
        Responder(res)
    assert get_suite("x25519-hqc1-qkd-hkdfsha256").backend == "liboqs"


@pytest.mark.parametrize("suite", ["x25519-mlkem1024-qkd-hkdfsha384", "mlkem768-x25519-qkd-hkdfsha256-sp80056c"])
def test_the_default_policy_refuses_sha384_and_sp800_56c_suites(suite: str) -> None:
    """docs/api.md: a responder with the default Policy() refuses a peer offering only these."""
    from hybridkex.exceptions import PolicyViolation

    from .helpers import QKDPair, run_pair

    ini, res = configs(suites=(suite,), res_suites=())
    out = run_pair(ini, res, QKDPair.create())
    assert isinstance(out.res_error, PolicyViolation) and "no suite acceptable" in str(out.res_error)
    assert isinstance(out.ini_error, PolicyViolation)
    # Listed on both sides, the same suite works.
    out = run_pair(*configs(suites=(suite,)), QKDPair.create())
    assert out.ok and out.ini_session is not None and out.ini_session.info.suite == suite


def test_the_responders_suite_order_wins() -> None:
    """docs/spec.md 5.1: the initiator's preference decides nothing."""
    from .helpers import QKDPair, run_pair

    a, b = "x25519-mlkem768-qkd-hkdfsha256", "x25519-mlkem1024-qkd-hkdfsha384"
    for ini_order, res_order in (((a, b), (b, a)), ((b, a), (a, b))):
        out = run_pair(*configs(suites=ini_order, res_suites=res_order), QKDPair.create())
        assert out.ok and out.ini_session is not None and out.ini_session.info.suite == res_order[0]
