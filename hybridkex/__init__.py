"""hybridkex: quantum-safe TLS 1.3 against "record now, decrypt later".

Every session key mixes an ML-KEM shared secret, an X25519 secret and a QKD key through the ETSI
TS 103 744 CatKDF combiner, with every public value bound in, and is fed to TLS 1.3 as an external
PSK.  Start with :func:`combine` and the suites in :mod:`hybridkex.suites`; low-level pieces live
in :mod:`hybridkex.hazmat` (read its warning first).
"""

from __future__ import annotations

import importlib as _importlib
from importlib import metadata as _metadata
from typing import TYPE_CHECKING

from . import exceptions as _exceptions
from .combiner import CombinedSecret, PartyView, QKDBinding, combine, encode_party
from .exceptions import *  # noqa: F403 - the whole exception tree is public API
from .policy import KeyBudget, Policy, QKDConfig, QKDMode, Timeouts
from .suites import DEFAULT_SUITE, SUITES, Suite, get_suite

try:
    __version__ = _metadata.version("hybridkex")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "DEFAULT_SUITE",
    "SUITES",
    "CombinedSecret",
    "KeyBudget",
    "PartyView",
    "Policy",
    "QKDBinding",
    "QKDConfig",
    "QKDMode",
    "Suite",
    "Timeouts",
    "__version__",
    "combine",
    "encode_party",
    "get_suite",
]
__all__ += _exceptions.__all__

# The connect/serve API (hybridkex.api) loads on first use: it needs the handshake's cryptography and,
# once a connection is made, pyOpenSSL, while ``import hybridkex`` must work without either.  The
# names stay out of ``__all__`` so that ``from hybridkex import *`` stays as light as the import.
_API = frozenset({
    "ClientConfig", "HybridAsyncServer", "HybridClient", "HybridHTTPConnection", "HybridHTTPServer",
    "HybridServer", "HybridSession", "HybridSocket", "HybridStreamReader", "HybridStreamWriter",
    "HybridTCPServer", "ReconnectPolicy", "ReconnectRegistry", "ReconnectTicket", "ServerConfig",
    "StateReads", "SteadyPolicy", "SteadyRegistry", "SteadyTicket", "TLSOptions", "connect", "open_connection", "serve",
    "start_server",
})

if TYPE_CHECKING:  # type checkers see the lazy names' real types (without this, each is an `object`)
    from .api import ClientConfig as ClientConfig
    from .api import HybridAsyncServer as HybridAsyncServer
    from .api import HybridClient as HybridClient
    from .api import HybridHTTPConnection as HybridHTTPConnection
    from .api import HybridHTTPServer as HybridHTTPServer
    from .api import HybridServer as HybridServer
    from .api import HybridSession as HybridSession
    from .api import HybridSocket as HybridSocket
    from .api import HybridStreamReader as HybridStreamReader
    from .api import HybridStreamWriter as HybridStreamWriter
    from .api import HybridTCPServer as HybridTCPServer
    from .api import ReconnectPolicy as ReconnectPolicy
    from .api import ReconnectRegistry as ReconnectRegistry
    from .api import ReconnectTicket as ReconnectTicket
    from .api import ServerConfig as ServerConfig
    from .api import StateReads as StateReads
    from .api import SteadyPolicy as SteadyPolicy
    from .api import SteadyRegistry as SteadyRegistry
    from .api import SteadyTicket as SteadyTicket
    from .api import TLSOptions as TLSOptions
    from .api import connect as connect
    from .api import open_connection as open_connection
    from .api import serve as serve
    from .api import start_server as start_server


def __getattr__(name: str) -> object:
    if name in _API:
        try:
            api = _importlib.import_module(".api", __name__)
        except ModuleNotFoundError as exc:
            if exc.name not in ("cryptography", "OpenSSL"):
                raise
            raise _exceptions.UnsupportedAlgorithm(
                f"hybridkex.{name} needs the {exc.name} package, which is not installed: "
                "pip install 'cryptography>=49,<51' 'pyOpenSSL>=26.2,<27'") from exc
        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
