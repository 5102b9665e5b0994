"""The steady state: after first contact, one TLS 1.3 round trip per connection with a fresh QKD key.

* :mod:`hybridkex.steady.derive`: the identity and PSK derivations (docs/spec.md, "Steady state");
* :class:`SteadyTicket` (client) and :class:`SteadyRegistry` (server): the state both ends keep;
* :func:`first_psk_identity`: the server reads the identity before TLS starts.

The connection setup (:mod:`hybridkex.io.setup`) uses them; most users never touch them.
"""

from .hello import first_psk_identity
from .peers import SteadyPeers, steady_peers
from .registry import SteadyClaim, SteadyRegistry, SteadyStats
from .ticket import SteadyAttempt, SteadyFacts, SteadyTicket

__all__ = [
    "SteadyAttempt",
    "SteadyClaim",
    "SteadyFacts",
    "SteadyPeers",
    "SteadyRegistry",
    "SteadyStats",
    "SteadyTicket",
    "first_psk_identity",
    "steady_peers",
]
