"""Configuration of the connect/serve APIs: frozen, validated objects.

* :class:`ClientConfig` bundles the hybrid handshake's :class:`~hybridkex.protocol.InitiatorConfig`
  with the TLS options, the reconnect policy and the connection-setup deadline.
* :class:`ServerConfig` does the same around a :class:`~hybridkex.protocol.ResponderConfig`, plus a
  bound on concurrent connections.
* :class:`TLSOptions`: key-exchange groups, ``require_pq``, key logging, the TLS stage's deadline.
* :class:`ReconnectPolicy`: zero-extra-round-trip reconnects (off by default), bounded in time and
  count.
* :class:`SteadyPolicy`: after first contact, one TLS round trip per connection with a fresh QKD key
  (on by default).

Every stage of connection setup has a deadline (docs/api.md, "Timeouts"): the whole setup is bounded
by ``timeout``; within it the hybrid handshake by ``policy.timeouts.handshake``, each key-source
call by ``policy.timeouts.kme`` and the TLS handshake by ``tls.timeout``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..exceptions import ConfigurationError
from ..protocol import InitiatorConfig, ResponderConfig

if TYPE_CHECKING:
    from ..state import SharedState

__all__ = ["ClientConfig", "ReconnectPolicy", "ServerConfig", "StateReads", "SteadyPolicy", "TLSOptions"]

#: Connection setup deadline (seconds) when none is configured: long enough for a KME round trip on
#: a slow network, short enough that a silent peer cannot hold a server slot for long.
DEFAULT_SETUP_TIMEOUT = 10.0
#: Hard ceilings keep a typo ("3600000") from turning into an unbounded server state.
_MAX_TIMEOUT = 3600.0
_MAX_USES = 65536
_MAX_LIFETIME = 7 * 24 * 3600.0
_MAX_SESSIONS = 1_000_000


def _seconds(value: Any, name: str, *, ceiling: float = _MAX_TIMEOUT) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"must be a number of seconds, got {value!r}", field=name)
    if not math.isfinite(value) or not 0 < value <= ceiling:
        raise ConfigurationError(f"must be > 0 and <= {ceiling:g} seconds, got {value!r}", field=name)
    return float(value)


def check_purge(every: Any, spent_older_than: Any, steady: SteadyPolicy, reconnect: ReconnectPolicy, *,
                prefix: str = "") -> None:
    """``purge_every`` and ``spent_older_than`` (ServerConfig, the tunnel's ``[state]``), or ConfigurationError."""
    if every != 0:
        _seconds(every, f"{prefix}purge_every", ceiling=_MAX_LIFETIME)
    if spent_older_than is None:
        return
    _seconds(spent_older_than, f"{prefix}spent_older_than", ceiling=10 * _MAX_LIFETIME)
    lifetimes: dict[str, float] = {}
    if steady.enabled:
        lifetimes.update({"steady.lifetime": steady.lifetime, "steady.key_lifetime": steady.key_lifetime})
    if reconnect.enabled:
        lifetimes["reconnect.lifetime"] = reconnect.lifetime
    for name, lifetime in lifetimes.items():
        if spent_older_than < lifetime:
            raise ConfigurationError(f"must be at least {name} ({lifetime:g} s): a spent ID purged earlier could "
                                     "be replayed while what it protects is still valid",
                                     field=f"{prefix}spent_older_than")


def _count(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"must be a whole number, got {value!r}", field=name)
    if not low <= value <= high:
        raise ConfigurationError(f"must be {low}..{high}, got {value}", field=name)
    return value


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """How the TLS 1.3 connection that carries the data is set up.

    ``groups``: an OpenSSL group list (string or sequence); default: clients offer
    ``*X25519MLKEM768:*X25519``, servers prefer X25519MLKEM768 and accept X25519.
    ``require_pq``: only X25519MLKEM768, so every connection also gets a post-quantum (EC)DHE secret
    from TLS itself (reconnects always use it, whatever this says).  ``keylog``: path of an
    SSLKEYLOGFILE to append the TLS secrets to; debugging only (warns; the file decrypts traffic).
    ``timeout``: the TLS handshake's own deadline in seconds (within the setup deadline).
    """

    groups: str | Sequence[str] | None = None
    require_pq: bool = False
    keylog: str | os.PathLike[str] | None = None
    timeout: float = DEFAULT_SETUP_TIMEOUT

    def __post_init__(self) -> None:
        if self.groups is not None:
            if isinstance(self.groups, str):
                text = self.groups
            elif isinstance(self.groups, Sequence) and all(isinstance(g, str) for g in self.groups):
                text = ":".join(self.groups)
            else:
                raise ConfigurationError("must be an OpenSSL group list (str) or a sequence of names",
                                         field="tls.groups")
            if not text.strip(":* "):
                raise ConfigurationError("no key-exchange group given", field="tls.groups")
            object.__setattr__(self, "groups", text)  # one hashable spelling
        if not isinstance(self.require_pq, bool):
            raise ConfigurationError("must be True or False", field="tls.require_pq")
        if self.keylog is not None:
            if not isinstance(self.keylog, str | os.PathLike):
                raise ConfigurationError("must be a path", field="tls.keylog")
            object.__setattr__(self, "keylog", os.fspath(self.keylog))
        object.__setattr__(self, "timeout", _seconds(self.timeout, "tls.timeout"))


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Zero-extra-round-trip reconnects (docs/api.md, "Reconnects").  Off by default.

    After a full hybrid handshake, a client may open up to ``max_uses`` further connections to the
    same server within ``lifetime`` seconds, each going straight to TLS 1.3 with its own PSK derived
    from the parent session (and X25519MLKEM768 for a fresh post-quantum secret).  Both ends must
    enable it; the server's limits are the ones enforced, and it keeps at most ``max_sessions``
    parent sessions (the oldest is dropped first).
    """

    enabled: bool = False
    #: Reconnects one full handshake allows (each uses a new identity and key, at most once).
    max_uses: int = 64
    #: Seconds after the full handshake during which reconnects are accepted.
    lifetime: float = 300.0
    #: Server side: parent sessions remembered at once (bounded memory).
    max_sessions: int = 10_000

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigurationError("must be True or False", field="reconnect.enabled")
        object.__setattr__(self, "max_uses", _count(self.max_uses, "reconnect.max_uses", 1, _MAX_USES))
        object.__setattr__(self, "lifetime", _seconds(self.lifetime, "reconnect.lifetime", ceiling=_MAX_LIFETIME))
        object.__setattr__(self, "max_sessions",
                           _count(self.max_sessions, "reconnect.max_sessions", 1, _MAX_SESSIONS))


@dataclass(frozen=True, slots=True)
class SteadyPolicy:
    """The steady state (docs/api.md, "Steady state"): on by default.

    After one full, authenticated hybrid handshake, every further connection to the same server is
    a single TLS 1.3 handshake whose PSK mixes a fresh QKD key (reserved by the client, the ETSI
    master, and announced one connection ahead so the server holds it in time) with an
    authentication key derived from the full handshake's QKD-mixed output.  Both ends must enable
    it; a server that refuses a steady-state connection makes the client run one full handshake.
    """

    enabled: bool = True
    #: Steady-state connections one full handshake allows.
    max_uses: int = 65536
    #: Seconds a full handshake's authentication key serves; then one full handshake renews it.
    lifetime: float = 3600.0
    #: Client side: QKD keys kept reserved and announced ahead, at least (up to twice as many are
    #: held; 0: none, and the server fetches each key on demand, inside the handshake).
    announce: int = 4
    #: Seconds an announced, unused QKD key is kept before both ends erase it.
    key_lifetime: float = 300.0
    #: Server side: parent sessions remembered at once (bounded memory).
    max_sessions: int = 10_000

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigurationError("must be True or False", field="steady.enabled")
        object.__setattr__(self, "max_uses", _count(self.max_uses, "steady.max_uses", 1, 2**31))
        object.__setattr__(self, "lifetime", _seconds(self.lifetime, "steady.lifetime", ceiling=_MAX_LIFETIME))
        object.__setattr__(self, "announce", _count(self.announce, "steady.announce", 0, 8))
        object.__setattr__(self, "key_lifetime", _seconds(self.key_lifetime, "steady.key_lifetime",
                                                          ceiling=_MAX_LIFETIME))
        object.__setattr__(self, "max_sessions", _count(self.max_sessions, "steady.max_sessions", 1, _MAX_SESSIONS))


def _rate(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not (
            0 <= value <= 1_000_000):
        raise ConfigurationError(f"must be a number of reads per second, 0..1000000 (0: no limit), got {value!r}",
                                 field=name)
    return float(value)


@dataclass(frozen=True, slots=True)
class StateReads:
    """Bounds on the shared-state reads that steady-state identities for parents this process does
    not hold cause (docs/fleet.md, "Unknown parents").  Such an identity can only be checked once
    its parent is read, so without a bound a flood of well-formed identities with random parent
    handles is a flood of database queries.

    Before such a read: a handle the state did not hold ``unknown_ttl`` seconds ago is refused
    without one (the last ``unknown_max`` such handles are remembered); then one token per read is
    taken from a bucket per process (``rate`` reads per second, ``burst`` at once) and one per source
    address (``address_rate``/``address_burst``; IPv4 address, IPv6 /64).  A read that finds a
    parent whose tag verifies gives its tokens back, so the buckets count reads that found nothing.
    A refused identity is refused like an unknown one: the client runs a full handshake, under the
    server's normal limits.  A rate of 0 disables that bucket.
    """

    rate: float = 20.0
    burst: int = 100
    address_rate: float = 2.0
    address_burst: int = 20
    unknown_ttl: float = 2.0
    unknown_max: int = 10_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", _rate(self.rate, "state_reads.rate"))
        object.__setattr__(self, "address_rate", _rate(self.address_rate, "state_reads.address_rate"))
        object.__setattr__(self, "burst", _count(self.burst, "state_reads.burst", 1, 1_000_000))
        object.__setattr__(self, "address_burst", _count(self.address_burst, "state_reads.address_burst", 1,
                                                         1_000_000))
        object.__setattr__(self, "unknown_ttl", _seconds(self.unknown_ttl, "state_reads.unknown_ttl"))
        object.__setattr__(self, "unknown_max", _count(self.unknown_max, "state_reads.unknown_max", 1, _MAX_SESSIONS))


def _sub(value: Any, cls: type, name: str) -> None:
    if not isinstance(value, cls):
        raise ConfigurationError(f"must be a {cls.__name__}, not {type(value).__name__}", field=name)


def _check_setup(config: ClientConfig | ServerConfig, handshake_type: type) -> None:
    """Validate (and normalize) the fields both setups share."""
    _sub(config.handshake, handshake_type, "handshake")
    _sub(config.tls, TLSOptions, "tls")
    _sub(config.reconnect, ReconnectPolicy, "reconnect")
    _sub(config.steady, SteadyPolicy, "steady")
    object.__setattr__(config, "timeout", _seconds(config.timeout, "timeout"))


_Setup = TypeVar("_Setup", "ClientConfig", "ServerConfig")


def _coerce(cls: type[_Setup], config: object, handshake_type: type[Any]) -> _Setup:
    """``config`` itself, or a ``cls`` with defaults around a bare handshake configuration."""
    if isinstance(config, cls):
        return config
    if isinstance(config, handshake_type):
        return cls(config)
    raise ConfigurationError(f"must be a {cls.__name__} or {handshake_type.__name__}, not {type(config).__name__}",
                             field="config")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything :func:`hybridkex.connect` / :func:`hybridkex.open_connection` need besides the
    address and the key source.

    Args:
        handshake: the hybrid handshake's initiator configuration (identity, authenticators,
            policy, QKD place, expected server identity).
        tls: TLS options.
        reconnect: the reconnect policy (off by default).
        timeout: deadline in seconds for the whole connection setup: TCP connect, hybrid
            handshake (itself bounded by ``handshake.policy.timeouts``) and TLS handshake.
        steady: the steady-state policy (on by default; ``SteadyPolicy(enabled=False)`` makes every
            connection a full handshake).
    """

    handshake: InitiatorConfig
    tls: TLSOptions = field(default_factory=TLSOptions)
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    timeout: float = DEFAULT_SETUP_TIMEOUT
    steady: SteadyPolicy = field(default_factory=SteadyPolicy)

    def __post_init__(self) -> None:
        _check_setup(self, InitiatorConfig)

    @classmethod
    def coerce(cls, config: ClientConfig | InitiatorConfig) -> ClientConfig:
        """``config`` itself, or a :class:`ClientConfig` with defaults around an InitiatorConfig."""
        return _coerce(cls, config, InitiatorConfig)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything a hybridkex server needs besides the address, the handler and the key source.

    Args:
        handshake: the hybrid handshake's responder configuration.
        tls: TLS options.
        reconnect: the reconnect policy (off by default; enforced here for every client).
        timeout: deadline in seconds for one connection's setup, from accept to the verified TLS
            session (first byte, hybrid handshake, TLS handshake).  A silent or slow peer is
            dropped when it passes; it never delays other connections.
        max_connections: connections handled at once (handshakes and handlers); more are closed
            at once, with a log line.
        steady: the steady-state policy (on by default; enforced here for every client).
        state: a :class:`~hybridkex.state.SharedState` (``hybridkex.state.open_state(url)``) shared
            with the other processes or hosts serving the same clients: steady-state counters and
            QKD key IDs are spent there too (docs/fleet.md).  None: this process only.
        purge_every: with a ``state``, delete its expired rows every so many seconds, in a background
            thread (one per state object in a process, however many servers use it); 0: never (run
            ``hybridkex state purge`` instead).  Of several processes on one state, one purging is
            enough.
        spent_older_than: with ``purge_every``, also delete spent IDs older than this many seconds
            (None: keep them).  Refused below the longest lifetime of what the spent IDs protect
            (``steady.lifetime`` and ``steady.key_lifetime``, ``reconnect.lifetime`` when on), so no
            replay outlives its record.
        state_reads: with a ``state``, the bounds on the reads that steady-state identities for
            parents not in this process's memory cause (:class:`StateReads`).
    """

    handshake: ResponderConfig
    tls: TLSOptions = field(default_factory=TLSOptions)
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    timeout: float = DEFAULT_SETUP_TIMEOUT
    max_connections: int = 256
    steady: SteadyPolicy = field(default_factory=SteadyPolicy)
    state: SharedState | None = field(default=None, repr=False)
    purge_every: float = 600.0
    spent_older_than: float | None = None
    state_reads: StateReads = field(default_factory=StateReads)

    def __post_init__(self) -> None:
        _check_setup(self, ResponderConfig)
        _sub(self.state_reads, StateReads, "state_reads")
        check_purge(self.purge_every, self.spent_older_than, self.steady, self.reconnect)
        if self.state is not None and not (callable(getattr(self.state, "spend", None))
                                           and callable(getattr(self.state, "spend_counter", None))):
            raise ConfigurationError("must be a hybridkex.state.SharedState (hybridkex.state.open_state(url))",
                                     field="state")
        object.__setattr__(self, "max_connections", _count(self.max_connections, "max_connections", 1, 1_000_000))

    @classmethod
    def coerce(cls, config: ServerConfig | ResponderConfig) -> ServerConfig:
        """``config`` itself, or a :class:`ServerConfig` with defaults around a ResponderConfig."""
        return _coerce(cls, config, ResponderConfig)
