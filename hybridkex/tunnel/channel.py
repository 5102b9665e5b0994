"""The seam between the tunnel runtime and the secure channel.

The runtime (listeners, limits, relay, logs, metrics, signals) never knows *how* a connection is
secured.  It hands the raw TCP streams of each connection to a :class:`ChannelFactory`, which runs
the handshake and returns a :class:`SecureStream`; the runtime then relays bytes between that
stream and the plaintext side.  A factory is built from the configuration by a
:data:`ChannelFactoryProvider`.

The CLI finds the provider with :func:`resolve_channel_provider`: the real one is
``build_channel_factory`` in the module :data:`SECURE_MODULE`.  The insecure plain channel used by
the tunnel's own tests is reachable only through a test hook (two environment variables, see
:data:`TEST_HOOK_ENV`), never through configuration or flags.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final, Protocol, cast

from ..exceptions import ConfigurationError, UnsupportedAlgorithm
from .streams import PlainStream, SecureStream

if TYPE_CHECKING:
    from .config import TunnelConfig
    from .metrics import TunnelMetrics

__all__ = [
    "SECURE_MODULE",
    "TESTING_ENV",
    "TEST_HOOK_ENV",
    "ChannelCheck",
    "ChannelFactory",
    "ChannelFactoryProvider",
    "PlainStream",
    "SecureStream",
    "resolve_channel_check",
    "resolve_channel_provider",
]

#: Module that provides the real channel: ``async def build_channel_factory(config, metrics)`` and
#: ``def check_channel_config(config)`` (the loader ``--check-config`` and startup share).
SECURE_MODULE: Final = "hybridkex.tunnel.secure"
#: TEST-ONLY hook: set to "1" (together with :data:`TESTING_ENV` = "1") to run the tunnel over the
#: insecure plain channel. Without HYBRIDKEX_TESTING=1 the tunnel refuses to start.
TEST_HOOK_ENV: Final = "HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL"
TESTING_ENV: Final = "HYBRIDKEX_TESTING"


class ChannelFactory(Protocol):
    """Secures connections. One instance serves many connections concurrently.

    ``accept``/``connect`` raise a :class:`~hybridkex.exceptions.HybridKEXError` subclass when the
    handshake fails (the runtime logs it, counts it by class and closes the connection); the runtime
    enforces the handshake deadline by cancelling them.  ``reconfigure`` is called on SIGHUP with a
    new, validated configuration: it must either apply it completely (affecting only new
    connections) or raise :class:`~hybridkex.exceptions.ConfigurationError` and keep the old one.
    ``aclose`` is called once, when the tunnel stops.  ``refuse`` tells a peer whose connection
    the server's limits refused, in the channel's terms, before the runtime closes it (the real
    channel: Abort "rate limited"); a client's ``connect`` raises
    :class:`~hybridkex.exceptions.RateLimited` when it is told so.  The server's per-peer limit is
    checked by calling :func:`hybridkex.tunnel.limits.admit_peer` with the identity the peer claims.
    """

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     peer_addr: str) -> SecureStream:
        """Server side: run the handshake with the peer at ``peer_addr``."""
        ...

    async def connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> SecureStream:
        """Client side: run the handshake with the tunnel server at ``config.target``."""
        ...

    async def refuse(self, writer: asyncio.StreamWriter) -> None:
        """Server side: tell the peer its connection is refused under the limits (nothing read yet)."""
        ...

    async def reconfigure(self, config: TunnelConfig) -> None: ...

    async def aclose(self) -> None: ...


#: Builds the channel factory for a configuration; gets the metrics to report pool level/KME errors.
ChannelFactoryProvider = Callable[["TunnelConfig", "TunnelMetrics"], Awaitable[ChannelFactory]]


async def _insecure_plain_provider(config: TunnelConfig, metrics: TunnelMetrics) -> ChannelFactory:
    # Imported only here so the insecure channel is not even loaded unless the test hook selects it.
    from ._insecure_plain import InsecurePlainChannelFactory  # noqa: PLC0415

    return InsecurePlainChannelFactory(config)


def insecure_test_hook_active(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the test hook selects the insecure plain channel; refuses it outside tests."""
    env = os.environ if environ is None else environ
    if not env.get(TEST_HOOK_ENV):
        return False
    if env.get(TESTING_ENV) != "1" or env.get(TEST_HOOK_ENV) != "1":
        raise ConfigurationError(
            "test-only hook that disables all security; refused outside the test suite, unset it",
            field=TEST_HOOK_ENV)
    return True


#: Validates what a configuration names for the channel (key files...) exactly as startup loads it.
ChannelCheck = Callable[["TunnelConfig"], None]


def _nothing_to_load(config: TunnelConfig) -> None:
    return None


def resolve_channel_check(environ: Mapping[str, str] | None = None) -> ChannelCheck:
    """The channel's ``check_channel_config`` (``--check-config`` and startup share it)."""
    if insecure_test_hook_active(environ):
        return _nothing_to_load  # the insecure test channel reads no files
    resolve_channel_provider(environ)  # a clear error if the secure channel is missing
    return cast(ChannelCheck, importlib.import_module(SECURE_MODULE).check_channel_config)


def resolve_channel_provider(environ: Mapping[str, str] | None = None) -> tuple[ChannelFactoryProvider, bool]:
    """The provider the CLI uses, and whether it is the INSECURE test channel."""
    if insecure_test_hook_active(environ):
        return _insecure_plain_provider, True
    if importlib.util.find_spec(SECURE_MODULE) is None:
        raise UnsupportedAlgorithm(
            f"the hybrid secure channel is not available in this build ({SECURE_MODULE} is missing); "
            "install a hybridkex release that includes it")
    module = importlib.import_module(SECURE_MODULE)
    return cast(ChannelFactoryProvider, module.build_channel_factory), False
