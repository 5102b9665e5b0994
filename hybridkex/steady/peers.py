"""Who is who in the steady state: the client is the ETSI GS QKD 014 master, the server the slave.

Why the client: it announces the key IDs it reserved inside its own ClientHello (the PSK identity,
covered by the TLS binder), so the TLS stream stays the application's byte for byte and any TLS 1.3
stack with external PSKs can be the client; and a server with many clients never has to reserve
keys for each of them ahead of time.  The parent's SAE and KME IDs tell each side the other's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..combiner import QKDBinding
from ..protocol import SessionInfo

__all__ = ["SteadyPeers", "steady_peers"]


@dataclass(frozen=True, slots=True)
class SteadyPeers:
    """The SAE and KME IDs of the steady state's master (client) and slave (server)."""

    client_sae_id: str
    client_kme_id: str
    server_sae_id: str
    server_kme_id: str

    @property
    def ids(self) -> tuple[str, str, str, str]:
        """(master SAE, slave SAE, master KME, slave KME): the order of a QKD binding."""
        return (self.client_sae_id, self.server_sae_id, self.client_kme_id, self.server_kme_id)

    def binding(self, key_ids: tuple[str, ...]) -> QKDBinding:
        return QKDBinding(key_ids=key_ids, master_sae_id=self.client_sae_id, slave_sae_id=self.server_sae_id,
                          master_kme_id=self.client_kme_id, slave_kme_id=self.server_kme_id)


def steady_peers(info: SessionInfo, local_sae_id: str | None) -> SteadyPeers | None:
    """The steady state's roles after the parent ``info``, seen from the SAE ``local_sae_id``;
    None when the parent ran without QKD or this side's SAE is not one of the parent's."""
    m, s = info.master_sae_id, info.slave_sae_id
    mk, sk = info.master_kme_id, info.slave_kme_id
    if not info.qkd_used or None in (m, s, mk, sk) or local_sae_id is None:
        return None
    assert m is not None and s is not None and mk is not None and sk is not None
    if local_sae_id == m:
        local, local_kme, peer, peer_kme = m, mk, s, sk
    elif local_sae_id == s:
        local, local_kme, peer, peer_kme = s, sk, m, mk
    else:
        return None
    if info.role == "initiator":
        return SteadyPeers(local, local_kme, peer, peer_kme)
    return SteadyPeers(peer, peer_kme, local, local_kme)
