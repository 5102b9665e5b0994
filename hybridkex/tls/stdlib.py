"""TLS 1.3 external PSK with the standard library ``ssl`` module (Python >= 3.13).

Python 3.13 added ``SSLContext.set_psk_client_callback`` / ``set_psk_server_callback``.  They use
OpenSSL's legacy PSK callbacks, which limits what this adapter can offer compared with
:mod:`hybridkex.tls.pyopenssl`:

* SHA-256 only: the PSK is always bound to a SHA-256 suite (a SHA-384 suite raises
  :class:`~hybridkex.exceptions.UnsupportedAlgorithm`);
* identities are UTF-8 ``str`` of at most 256 bytes without NUL;
* no group selection and no way to read the negotiated group before Python 3.15, so
  ``require_pq`` is unsupported and :attr:`TLSInfo.group` is None.  psk_dhe_ke is still
  guaranteed by construction: ``SSL_OP_ALLOW_NO_DHE_KEX`` is cleared, and without it OpenSSL
  neither offers nor accepts psk_ke;
* no TLS exporter, hence no ``tls-exporter`` channel binding.

Imports only the standard library and hybridkex's pure modules, so it runs where pyOpenSSL and
cryptography are not installed.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Final, Literal

from ..exceptions import (
    ConfigurationError,
    HandshakeTimeout,
    LocalProtocolError,
    TLSError,
    UnsupportedAlgorithm,
)
from ..suites import DEFAULT_SUITE, Suite
from ._common import CIPHER_HASH, TLSInfo, check_identity, check_psk, resolve_cipher
from ._errors import PSKObservation, translate

__all__ = ["DEFAULT_TIMEOUT", "client_context", "server_context", "verify_connection", "wrap_socket"]

_log = logging.getLogger("hybridkex.tls")

DEFAULT_TIMEOUT: Final = 30.0
#: OpenSSL's legacy PSK API limits identities to 256 bytes (PSK_MAX_IDENTITY_LEN).
MAX_STDLIB_IDENTITY_LEN: Final = 256
# Not exported by the ssl module; must stay clear so that only psk_dhe_ke is possible.
_OP_ALLOW_NO_DHE_KEX: Final = 1 << 10

PSKLookup = Callable[[bytes], "bytes | None"]


def _require_psk_support() -> None:
    if sys.version_info < (3, 13):
        raise UnsupportedAlgorithm(
            f"the stdlib ssl TLS-PSK adapter needs Python >= 3.13 (this is {sys.version.split()[0]}); "
            "use hybridkex.tls.client_context()/server_context() (pyOpenSSL) instead"
        )
    if not getattr(ssl, "HAS_PSK", False):
        raise UnsupportedAlgorithm(
            f"this Python's ssl module was built without PSK support ({ssl.OPENSSL_VERSION}); "
            "use the pyOpenSSL adapter instead"
        )


def _check_suite(suite: Suite | str) -> str:
    cipher = resolve_cipher(suite)
    if CIPHER_HASH[cipher] != "sha256":
        raise UnsupportedAlgorithm(
            f"stdlib ssl binds external PSKs to SHA-256 only; {suite} needs {cipher}: use the pyOpenSSL "
            "adapter (hybridkex.tls.client_context/server_context) for SHA-384 suites"
        )
    return cipher


def _stdlib_identity(identity: bytes | str) -> tuple[bytes, str]:
    raw = check_identity(identity, max_len=MAX_STDLIB_IDENTITY_LEN)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(
            "stdlib ssl needs a UTF-8 identity; hex-encode binary identities or use the pyOpenSSL adapter",
            field="identity",
        ) from None
    if "\x00" in text:
        raise ConfigurationError("must not contain NUL (OpenSSL's legacy PSK API is C-string based)", field="identity")
    return raw, text


def _base_context(protocol: ssl._SSLMethod, require_pq: bool) -> ssl.SSLContext:
    _require_psk_support()
    if require_pq:
        raise UnsupportedAlgorithm(
            "stdlib ssl cannot choose or check the key-exchange group before Python 3.15; use the pyOpenSSL "
            "adapter to require X25519MLKEM768"
        )
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options = ssl.Options(int(ctx.options) & ~_OP_ALLOW_NO_DHE_KEX) | ssl.OP_NO_TICKET
    return ctx


class _Handshake(threading.local):
    """What the server callback saw during the handshake this thread is running via :func:`wrap_socket`."""

    seen: PSKObservation | None = None
    error: BaseException | None = None


_CURRENT = _Handshake()
# The identity each client context offers, for TLSInfo (the ssl module does not report it).
_CLIENT_IDENTITIES: weakref.WeakKeyDictionary[ssl.SSLContext, bytes] = weakref.WeakKeyDictionary()


def client_context(
    identity: bytes | str, psk: bytes, *, suite: Suite | str = DEFAULT_SUITE, require_pq: bool = False
) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` (client) offering the external PSK ``(identity, psk)`` over TLS 1.3.

    The identity must be UTF-8 (<= 256 bytes); the suite must use SHA-256.  Any server certificate
    is refused (no trust anchors are loaded and verification is required).

    Raises:
        UnsupportedAlgorithm: Python < 3.13, no PSK support, a SHA-384 suite, or ``require_pq``.
        ConfigurationError, InvalidKeyMaterial: bad identity or key.
    """
    _check_suite(suite)
    raw, text = _stdlib_identity(identity)
    key = check_psk(psk)
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, require_pq)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED  # with an empty trust store: every certificate fails
    if sys.version_info >= (3, 13):
        ctx.set_psk_client_callback(lambda hint: (text, key))
    _CLIENT_IDENTITIES[ctx] = raw
    return ctx


def server_context(
    psk_lookup: PSKLookup | Mapping[bytes, bytes],
    *,
    suite: Suite | str = DEFAULT_SUITE,
    require_pq: bool = False,
) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` (server) accepting clients whose identity ``psk_lookup`` knows.

    ``psk_lookup`` gets the identity as UTF-8 bytes and returns the key (16..512 bytes) or None.
    An exception it raises fails the handshake and is re-raised by :func:`wrap_socket` (the ssl
    module would otherwise only print it).  No session tickets are issued.
    """
    _check_suite(suite)
    lookup: PSKLookup = dict(psk_lookup).get if isinstance(psk_lookup, Mapping) else psk_lookup
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, require_pq)
    ctx.num_tickets = 0  # nothing to resume: every connection consumes the external PSK

    def callback(identity: str | None) -> bytes:
        seen = _CURRENT.seen
        try:
            if seen is not None:
                seen.identity_offered = True
            if identity is None:
                return b""
            raw = identity.encode("utf-8")
            key = lookup(raw)
            if key is None:
                return b""
            key = check_psk(key, field_name="the key psk_lookup returned")
            if seen is not None:
                seen.identity_found = True
                seen.used_identity = raw
            return key
        except BaseException as exc:  # ssl would print it as "unraisable"; keep it for wrap_socket
            if seen is not None and _CURRENT.error is None:
                _CURRENT.error = exc
            else:
                _log.error("PSK lookup raised %s outside hybridkex.tls.stdlib.wrap_socket", type(exc).__name__)
            return b""

    if sys.version_info >= (3, 13):
        ctx.set_psk_server_callback(callback)
    return ctx


def verify_connection(
    conn: ssl.SSLSocket | ssl.SSLObject, *, psk_identity: bytes | None = None
) -> TLSInfo:
    """Post-handshake checks the stdlib allows: TLS 1.3, a SHA-256 suite, no peer certificate, a
    PSK handshake (``session_reused``).  The group cannot be read before Python 3.15."""
    version = conn.version()
    if version != "TLSv1.3":
        raise TLSError(f"negotiated {version}, but only TLSv1.3 is allowed")
    cipher_info = conn.cipher()
    cipher = cipher_info[0] if cipher_info else "none"
    if not cipher.endswith("_SHA256"):
        raise TLSError(f"negotiated cipher suite {cipher}, but the PSK is bound to SHA-256")
    if conn.getpeercert(binary_form=True) is not None:
        raise TLSError("a certificate was used in a handshake that must rely on the external PSK only")
    if not conn.session_reused:
        raise TLSError("the handshake did not use the external PSK")
    return TLSInfo(
        role="server" if conn.server_side else "client",
        version=version,
        cipher=cipher,
        group=None,
        psk_identity=psk_identity,
    )


def wrap_socket(
    ctx: ssl.SSLContext,
    sock: socket.socket,
    *,
    server_side: bool,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> tuple[ssl.SSLSocket, TLSInfo]:
    """Wrap a connected socket, handshake within ``timeout`` seconds and verify.

    Returns ``(ssl_socket, info)``; the socket's previous timeout is restored.  Failures raise the
    same typed errors as the pyOpenSSL adapter (and whatever ``psk_lookup`` raised); the caller
    closes the socket.
    """
    if timeout is not None and timeout <= 0:
        raise ConfigurationError("must be positive or None", field="timeout")
    if server_side != (ctx.protocol == ssl.PROTOCOL_TLS_SERVER):
        raise LocalProtocolError(f"this context cannot be used with server_side={server_side}")
    previous = sock.gettimeout()
    ssock = ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    seen = PSKObservation()
    _CURRENT.seen, _CURRENT.error = seen, None
    deadline = None if timeout is None else time.monotonic() + timeout
    ssock.setblocking(False)
    try:
        while True:
            try:
                ssock.do_handshake()
                break
            except ssl.SSLWantReadError:
                _wait(ssock, False, deadline, timeout)
            except ssl.SSLWantWriteError:
                _wait(ssock, True, deadline, timeout)
            except ssl.SSLError as exc:
                captured = _CURRENT.error
                if captured is not None:
                    raise captured from exc
                role: Literal["client", "server"] = "server" if server_side else "client"
                raise translate([exc.reason or str(exc)], role=role, seen=seen) from exc
            except (ConnectionError, OSError) as exc:
                raise TLSError("the peer closed the connection during the TLS handshake") from exc
    finally:
        _CURRENT.seen, _CURRENT.error = None, None
        with contextlib.suppress(OSError):
            ssock.settimeout(previous)
    identity = seen.used_identity if server_side else _CLIENT_IDENTITIES.get(ctx)
    return ssock, verify_connection(ssock, psk_identity=identity)


def _wait(sock: ssl.SSLSocket, for_write: bool, deadline: float | None, timeout: float | None) -> None:
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        raise HandshakeTimeout(f"TLS handshake did not finish within {timeout:g} s")
    readable, writable, _ = select.select([] if for_write else [sock], [sock] if for_write else [], [], remaining)
    if not readable and not writable:
        raise HandshakeTimeout(f"TLS handshake did not finish within {timeout:g} s")
