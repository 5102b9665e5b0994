"""``hybridkex tunnel``: put a quantum-safe channel in front of any TCP service.

The runtime here (configuration, listeners, limits, relay with half-close, logs, metrics, signals,
reload) is independent of how a connection is secured: that is the job of a
:class:`~hybridkex.tunnel.channel.ChannelFactory`, built per configuration by a
:data:`~hybridkex.tunnel.channel.ChannelFactoryProvider`.  See ``docs/tunnel.md``.
"""

from __future__ import annotations

from .channel import ChannelFactory, ChannelFactoryProvider, resolve_channel_provider
from .client import TunnelClient
from .config import Overrides, PeerConfig, TunnelConfig, load_config
from .metrics import TunnelMetrics
from .runtime import ConfigLoader, TunnelRuntime
from .server import TunnelServer
from .streams import PlainStream, SecureStream

__all__ = [
    "ChannelFactory",
    "ChannelFactoryProvider",
    "ConfigLoader",
    "Overrides",
    "PeerConfig",
    "PlainStream",
    "SecureStream",
    "TunnelClient",
    "TunnelConfig",
    "TunnelMetrics",
    "TunnelRuntime",
    "TunnelServer",
    "load_config",
    "make_runtime",
    "resolve_channel_provider",
]


def make_runtime(config: TunnelConfig, provider: ChannelFactoryProvider, *, loader: ConfigLoader | None = None,
                 insecure: bool = False, reuse_port: bool = False, metrics_endpoint: bool = True) -> TunnelRuntime:
    """The runtime for ``config.role``; ``await runtime.run()`` serves until SIGTERM."""
    cls = TunnelServer if config.role == "server" else TunnelClient
    return cls(config, provider, loader=loader, insecure=insecure, reuse_port=reuse_port,
               metrics_endpoint=metrics_endpoint)
