"""The tunnel configuration's objects: frozen dataclasses, the schema's constants and defaults.

:mod:`hybridkex.tunnel.config` builds them from a TOML file and flags (and re-exports the public
ones: import them from there); this module only says what a valid configuration holds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from ._recycle import RecycleConfig
from ._state import StateConfig

__all__ = [
    "DEFAULT_METRICS_LISTEN",
    "DEFAULT_SUITES",
    "KEY_BUDGETS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_IDENTITY_BYTES",
    "PEER_MODES",
    "QKD_MODES",
    "Address",
    "ConfigWarning",
    "HealthConfig",
    "KMEConfig",
    "KeyBudget",
    "LimitsConfig",
    "LogFormat",
    "LogLevel",
    "LoggingConfig",
    "MetricsConfig",
    "PeerConfig",
    "PolicyConfig",
    "QKDMode",
    "Role",
    "TimeoutsConfig",
    "TunnelConfig",
]

Role = Literal["server", "client"]
QKDMode = Literal["required", "optional", "disabled"]
KeyBudget = Literal["fresh", "epoch"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

PEER_MODES: Final = ("psk", "pki", "recycled")
QKD_MODES: Final = ("required", "optional", "disabled")
KEY_BUDGETS: Final = ("fresh", "epoch")
LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

#: Default suites per QKD mode (the first is preferred).
DEFAULT_SUITES: Final[Mapping[str, tuple[str, ...]]] = {
    "required": ("x25519-mlkem768-qkd-hkdfsha256",),
    "optional": ("x25519-mlkem768-qkd-hkdfsha256", "x25519-mlkem768-hkdfsha256"),
    "disabled": ("x25519-mlkem768-hkdfsha256",),
}
DEFAULT_METRICS_LISTEN: Final = "127.0.0.1:9180"
MAX_IDENTITY_BYTES: Final = 255


# --- configuration objects ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP address: ``host`` is an IP literal or a DNS name, ``port`` 0 means "any free port"."""

    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer this side accepts (server) or talks to (client), and how it is authenticated.

    Only file *paths* are held here; key material is read by the channel factory, never by the
    runtime, so it cannot end up in a log line or a ``repr``.
    """

    identity: str
    mode: str
    psk_file: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    #: The peer's ETSI GS QKD 014 SAE ID (needed whenever QKD may be used).
    sae_id: str | None = None
    #: ``mode = "recycled"``: what authenticates the pair's first handshake (``"psk"`` or ``"pki"``).
    bootstrap: str | None = None


@dataclass(frozen=True, slots=True)
class KMEConfig:
    """This side's ETSI GS QKD 014 KME: a real one over mutual-TLS HTTPS, or the embedded simulator."""

    embedded: bool = False
    url: str | None = None
    sae_id: str | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Which suites may be negotiated, whether QKD is required, and how QKD keys are budgeted."""

    suites: tuple[str, ...] = DEFAULT_SUITES["required"]
    qkd: QKDMode = "required"
    key_budget: KeyBudget = "fresh"
    #: After first contact, one TLS round trip per connection with a fresh QKD key (docs/tunnel.md).
    steady: bool = True


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Deadlines in seconds. ``idle = 0`` disables the idle timeout."""

    handshake: float = 10.0
    idle: float = 300.0
    drain: float = 30.0
    connect: float = 10.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Connection limits (docs/tunnel.md, "Limits"); a rate of 0 disables that limit.

    ``handshake_rate``/``handshake_burst`` meter handshakes per authenticated peer identity (server
    default 500/s, burst 1000: room for a whole site's connection-per-request traffic through one
    tunnel client); ``address_rate``/``address_burst`` meter, per remote address and before any
    handshake work, the handshakes that are in flight or failed (20/s, burst 256).  Both are off
    on the client, whose connections come from local applications and are metered by the server.
    """

    max_connections: int = 1024
    handshake_rate: float = 500.0
    handshake_burst: int = 1000
    address_rate: float = 20.0
    address_burst: int = 256


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: LogFormat = "text"
    level: LogLevel = "info"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = False
    listen: Address = Address("127.0.0.1", 9180)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    enabled: bool = False


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """A configuration that is allowed but probably unwise (logged at startup and on reload)."""

    field: str
    message: str


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """A complete, validated tunnel configuration (immutable; a reload builds a new one)."""

    role: Role
    listen: Address
    target: Address
    identity: str
    peers: tuple[PeerConfig, ...]
    #: Client only: the identity of the peer (tunnel server) behind ``target``.
    target_identity: str | None = None
    kme: KMEConfig | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    #: ``[recycle]``: the recycled-key store (required when a peer has ``mode = "recycled"``).
    recycle: RecycleConfig | None = None
    #: ``[state]``: the state shared with other tunnel servers (docs/fleet.md), or None.
    state: StateConfig | None = None
    #: Worker processes sharing the listening port (``--workers``; 1 = this process serves), either role.
    workers: int = 1
    #: The file this configuration was read from, if any.
    source: Path | None = None
    warnings: tuple[ConfigWarning, ...] = ()

    def peer(self, identity: str) -> PeerConfig | None:
        """The configured peer called ``identity``, or ``None``."""
        for p in self.peers:
            if p.identity == identity:
                return p
        return None

    @property
    def peer_identities(self) -> frozenset[str]:
        return frozenset(p.identity for p in self.peers)
