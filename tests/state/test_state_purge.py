"""A server purges its shared state on its own (ServerConfig.purge_every), on both backends."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
from iohelpers import make_setup, running_server
from statehelpers import SEAL_KEY, raw_rows

from hybridkex.exceptions import ConfigurationError
from hybridkex.io.config import ServerConfig, SteadyPolicy
from hybridkex.state import open_state
from hybridkex.state.purger import auto_purge

WAIT = 15.0


def _purgers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hybridkex-state-purge"]


def _wait(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"no {what} within {WAIT}s"
        time.sleep(0.05)


def test_a_server_purges_expired_rows_without_the_cli(url: str) -> None:
    setup = make_setup()
    with open_state(url, seal_key=SEAL_KEY) as state:
        t = time.time()
        state.put_ticket("steady", b"expired", b"x", expires_at=t - 1)
        state.put_ticket("steady", b"live", b"y", expires_at=t + 3600)
        state.hold("pool", ["held-expired"], expires_at=t - 1)
        state.hold("pool", ["held-live"], expires_at=t + 3600)
        assert state.spend("qkd:a:b", ["spent-old"])
        # Steady state and reconnects off: nothing the spent IDs protect outlives 0.3 s.
        config = dataclasses.replace(setup.server, steady=SteadyPolicy(enabled=False), state=state,
                                     purge_every=0.2, spent_older_than=0.3)
        before = _purgers()
        with running_server(dataclasses.replace(setup, server=config)) as server:
            assert len(_purgers()) == len(before) + 1
            _wait(lambda: raw_rows(url, "state_spent") == [], "purge of the old spent ID")
            assert raw_rows(url, "state_tickets") == [("steady", b"live")]
            assert raw_rows(url, "state_held") == [("pool", "held-live")]
            assert server.hybrid.purge is not None and server.hybrid.purge.rounds >= 1
        assert _purgers() == before  # the server's close stopped its purger
        assert state.get_ticket("steady", b"live") is not None  # the state is the caller's, still open


def test_one_purger_per_state_and_process(tmp_path: object) -> None:
    with open_state(f"{tmp_path}/s.sqlite3") as state:
        before = len(_purgers())
        a, b = auto_purge(state, 600), auto_purge(state, 300)  # two servers of one process (a reload)
        assert len(_purgers()) == before + 1
        a.release()
        a.release()  # twice is once
        assert len(_purgers()) == before + 1
        b.release()
        assert len(_purgers()) == before


def test_a_failing_purge_is_one_line_and_not_fatal(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    state = open_state(f"{tmp_path}/s.sqlite3")
    state.close()  # every purge now fails, the way a vanished database would
    with caplog.at_level(logging.WARNING, logger="hybridkex.state"):
        handle = auto_purge(state, 0.1)
        try:
            _wait(lambda: handle.rounds >= 2, "second purge round after a failure")
        finally:
            handle.release()
    failed = [r for r in caplog.records if getattr(r, "event", None) == "state_purge_failed"]
    assert len(failed) >= 2 and all("\n" not in r.getMessage() for r in failed), caplog.text
    assert "cannot purge the shared state (retried in 0.1 s)" in failed[0].getMessage()


def test_spent_ids_outlive_what_they_protect() -> None:
    setup = make_setup()
    with pytest.raises(ConfigurationError, match=r"spent_older_than: must be at least steady.lifetime \(3600 s\)"):
        dataclasses.replace(setup.server, spent_older_than=600)
    with pytest.raises(ConfigurationError, match=r"purge_every: must be > 0"):
        ServerConfig(setup.server.handshake, purge_every=-1)
    assert dataclasses.replace(setup.server, spent_older_than=7200).spent_older_than == 7200
