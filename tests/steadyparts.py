"""What the steady-state unit tests share: a hand-driven clock and the parent session each side records."""

from __future__ import annotations

from hybridkex.protocol import SessionInfo


class Clock:
    """A clock the test moves by hand (``clock.now += 5``)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def parent_info(role: str, suite: str) -> SessionInfo:
    """A parent session as each side records it: the server (responder) was the ETSI master."""
    local, peer = ("client", "server") if role == "initiator" else ("server", "client")
    return SessionInfo(
        version=1, role=role, suite=suite, offered_suites=(suite,), local_identity=local,  # type: ignore[arg-type]
        peer_identity=peer, auth_mode="psk", components=(), qkd_used=True, qkd_usage="fresh",
        qkd_policy="required", qkd_key_ids=("00000000-0000-4000-8000-000000000000",), master_sae_id="sae-server",
        slave_sae_id="sae-client", master_kme_id="kme-server", slave_kme_id="kme-client", qkd_note=None,
        transcript_hash="00")
