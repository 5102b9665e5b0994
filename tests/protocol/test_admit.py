"""ResponderConfig.admit: a refusal before any QKD key is spent, told to the initiator as Abort 9."""

from __future__ import annotations

import dataclasses

import pytest

from hybridkex.exceptions import AuthenticationError, RateLimited
from hybridkex.protocol import AbortCode

from .helpers import INI_ID, ConnectionPair, QKDPair, configs


def test_rate_limited_is_abort_9_and_the_initiator_raises_it_typed() -> None:
    assert AbortCode.RATE_LIMITED == 9
    seen: list[str] = []

    def admit(identity: str) -> None:
        seen.append(identity)
        raise RateLimited(f"{identity} is over its handshake rate", peer_identity=identity)

    ini_cfg, res_cfg = configs()
    qkd = QKDPair.create()
    taken: list[object] = []

    def res_keys(event: object) -> list:  # type: ignore[type-arg]
        taken.append(event)
        return qkd.res.answer(event)  # type: ignore[arg-type]

    pair = ConnectionPair.create(ini_cfg, dataclasses.replace(res_cfg, admit=admit), qkd, res_keys=res_keys)
    out = pair.run()
    assert seen == [INI_ID]
    assert isinstance(out.res_error, RateLimited) and out.res_error.peer_identity == INI_ID
    assert isinstance(out.ini_error, RateLimited), out.ini_error
    assert "rate limited" in str(out.ini_error) and "retry later" in str(out.ini_error)
    assert out.frames[-1] == ("responder", b"HK\x01\x7f\x00\x00\x00\x01\x09")  # Abort, code 9
    assert taken == []  # refused before the responder asked its KME for a key


def test_admit_runs_after_unknown_identities_are_refused() -> None:
    calls: list[str] = []
    ini_cfg, res_cfg = configs()
    ini_cfg = dataclasses.replace(ini_cfg, identity="mallory")
    pair = ConnectionPair.create(ini_cfg, dataclasses.replace(res_cfg, admit=calls.append), QKDPair.create())
    out = pair.run()
    assert isinstance(out.res_error, AuthenticationError) and calls == []


@pytest.mark.parametrize("admit", [None, lambda identity: None])
def test_an_admitting_hook_changes_nothing(admit: object) -> None:
    ini_cfg, res_cfg = configs()
    assert ConnectionPair.create(ini_cfg, dataclasses.replace(res_cfg, admit=admit), QKDPair.create()).run().ok
