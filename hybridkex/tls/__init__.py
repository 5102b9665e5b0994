"""TLS 1.3 with an external PSK: an identity and a key in, a verified TLS 1.3 connection out.

The primary adapter is pyOpenSSL (:mod:`hybridkex.tls.pyopenssl`, re-exported here):
:func:`client_context`, :func:`server_context`, :func:`verify_connection`, :func:`handshake`,
:func:`wrap_socket`, :func:`channel_binding`, and :class:`MemoryTLS` / :class:`AsyncTLSStream` for
memory-BIO (asyncio) I/O.  :mod:`hybridkex.tls.stdlib` is the Python >= 3.13 ``ssl`` adapter (SHA-256
only).  See ``docs/tls.md``.

The pyOpenSSL names load lazily, so that ``hybridkex.tls.stdlib`` stays importable where pyOpenSSL
is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._common import (
    CIPHER_ID,
    DEFAULT_CLIENT_GROUPS,
    DEFAULT_SERVER_GROUPS,
    EXPORTER_LABEL,
    EXPORTER_LENGTH,
    PQ_GROUP,
    TLSInfo,
    psk_session_pem,
)

if TYPE_CHECKING:
    from ._bio import AsyncTLSStream, MemoryTLS
    from .pyopenssl import (
        DEFAULT_TIMEOUT,
        InsecureKeyLogWarning,
        MessageCallback,
        PSKLookup,
        bind_psk,
        bind_psk_lookup,
        channel_binding,
        client_context,
        export_keying_material,
        handshake,
        server_context,
        set_groups,
        verify_connection,
        wrap_socket,
    )

__all__ = [
    "CIPHER_ID",
    "DEFAULT_CLIENT_GROUPS",
    "DEFAULT_SERVER_GROUPS",
    "DEFAULT_TIMEOUT",
    "EXPORTER_LABEL",
    "EXPORTER_LENGTH",
    "PQ_GROUP",
    "AsyncTLSStream",
    "InsecureKeyLogWarning",
    "MemoryTLS",
    "MessageCallback",
    "PSKLookup",
    "TLSInfo",
    "bind_psk",
    "bind_psk_lookup",
    "channel_binding",
    "client_context",
    "export_keying_material",
    "handshake",
    "psk_session_pem",
    "server_context",
    "set_groups",
    "verify_connection",
    "wrap_socket",
]

_LAZY = {
    "AsyncTLSStream": "._bio",
    "MemoryTLS": "._bio",
    "DEFAULT_TIMEOUT": ".pyopenssl",
    "InsecureKeyLogWarning": ".pyopenssl",
    "MessageCallback": ".pyopenssl",
    "PSKLookup": ".pyopenssl",
    "bind_psk": ".pyopenssl",
    "bind_psk_lookup": ".pyopenssl",
    "channel_binding": ".pyopenssl",
    "client_context": ".pyopenssl",
    "export_keying_material": ".pyopenssl",
    "handshake": ".pyopenssl",
    "server_context": ".pyopenssl",
    "set_groups": ".pyopenssl",
    "verify_connection": ".pyopenssl",
    "wrap_socket": ".pyopenssl",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
