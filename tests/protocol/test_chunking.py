"""However the bytes are split in transit, the result is the same."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridkex.protocol import NEED_DATA, HandshakeComplete, Initiator

from .helpers import DeterministicRandom, QKDPair, clock, configs, run_pair

_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i: i + 1] for i in range(len(data))]


def test_byte_at_a_time_every_mode():
    q = QKDPair.create()
    for auth in ("psk", "pki-hybrid"):
        out = run_pair(*configs(auth=auth), q, chunks=one_byte_at_a_time)
        assert out.ok, (out.ini_error, out.res_error)
        assert out.ini_session.tls_psk() == out.res_session.tls_psk()


@_SETTINGS
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
       auth=st.sampled_from(["psk", "pki-ed25519"]))
def test_random_splits_in_both_directions(cuts, auth):
    def chunks(data: bytes) -> list[bytes]:
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        return [data[a:b] for a, b in itertools.pairwise(points) if b > a]

    out = run_pair(*configs(auth=auth), QKDPair.create(), chunks=chunks)
    assert out.ok, (out.ini_error, out.res_error)
    assert out.ini_session.tls_psk() == out.res_session.tls_psk()
    assert out.ini_session.info.transcript_hash == out.res_session.info.transcript_hash


class _Recorded:
    """One reference handshake: the responder's flight and the QKD keys the initiator fetched."""

    def __init__(self) -> None:
        q = QKDPair.create()
        self.keys: list = []

        def ini_keys(request):
            keys = q.ini.answer(request)
            self.keys = keys
            return keys

        from .helpers import ConnectionPair

        out = ConnectionPair.create(*configs(), q, seed=77, ini_keys=ini_keys).run()
        assert out.ok
        self.flight = b"".join(f for s, f in out.frames if s == "responder")
        self.final = out.frames[-1][1]
        self.psk = out.ini_session.tls_psk()


_REF: list[_Recorded] = []


def _reference() -> _Recorded:
    if not _REF:
        _REF.append(_Recorded())
    return _REF[0]


@_SETTINGS
@given(cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=20))
def test_split_input_gives_byte_identical_output(cuts):
    """A replayed initiator (same injected randomness) fed the recorded flight in random pieces
    produces exactly the recorded Finished and the same PSK."""
    ref = _reference()
    ini = Initiator(configs()[0], randbytes=DeterministicRandom(77), clock=clock)
    ini.data_to_send()
    points = sorted({c % (len(ref.flight) + 1) for c in cuts} | {0, len(ref.flight)})
    session = None
    for a, b in itertools.pairwise(points):
        ini.receive_data(ref.flight[a:b])
        while True:
            event = ini.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, HandshakeComplete):
                session = event.session
                break
            ini.provide_qkd_keys(ref.keys)
    assert session is not None
    assert ini.data_to_send() == ref.final
    assert session.tls_psk() == ref.psk
