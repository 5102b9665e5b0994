"""TLS 1.3 external-PSK contexts for pyOpenSSL: an identity and a PSK in, a verified connection out.

How the pieces fit:

* :func:`client_context` / :func:`server_context` build ready ``OpenSSL.SSL.Context`` objects:
  TLS 1.3 only, the PSK bound to one cipher suite (SHA-256 or SHA-384), psk_dhe_ke only (OpenSSL
  never offers or accepts psk_ke unless ``SSL_OP_ALLOW_NO_DHE_KEX`` is set, and it never is), the
  hybrid group X25519MLKEM768 offered next to X25519, session tickets and the session cache off so
  every connection consumes a fresh PSK, and no certificate anywhere (the client refuses any).
* Per-connection keys: a context may carry one client PSK or a server lookup, and each
  ``Connection`` may override it with :func:`bind_psk` / :func:`bind_psk_lookup` before the
  handshake, which is how a hybrid handshake hands each connection its own freshly derived PSK.
* :func:`verify_connection` runs the post-handshake assertions (TLS 1.3, a DHE/hybrid group
  negotiated and allowed, no certificate, the external PSK really used) and returns a
  :class:`TLSInfo`; :func:`handshake` and :func:`wrap_socket` drive a blocking socket with a
  deadline; :class:`hybridkex.tls.MemoryTLS` drives memory BIOs (asyncio).
* Failures become typed errors (:class:`~hybridkex.exceptions.PSKMismatch`,
  :class:`~hybridkex.exceptions.UnknownPSKIdentity`, :class:`~hybridkex.exceptions.PSKHashMismatch`,
  :class:`~hybridkex.exceptions.TLSError`); an exception raised by your lookup inside OpenSSL's
  callback is re-raised from the handshake call, never printed.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import select
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Literal

from ..exceptions import (
    ConfigurationError,
    HandshakeTimeout,
    HybridKEXError,
    LocalProtocolError,
    TLSError,
    UnsupportedAlgorithm,
)
from ..suites import DEFAULT_SUITE, Suite
from . import _shim
from ._common import (
    CIPHER_ID,
    DEFAULT_CLIENT_GROUPS,
    DEFAULT_SERVER_GROUPS,
    EXPORTER_LABEL,
    EXPORTER_LENGTH,
    PQ_GROUP,
    TLSInfo,
    check_identity,
    check_psk,
    group_names,
    normalize_group,
    resolve_cipher,
)
from ._errors import PSKObservation, translate

if TYPE_CHECKING:
    from OpenSSL import SSL
else:  # through the shim, so a missing or unsupported pyOpenSSL raises UnsupportedAlgorithm
    SSL = _shim.SSL

__all__ = [
    "DEFAULT_TIMEOUT",
    "InsecureKeyLogWarning",
    "MessageCallback",
    "PSKLookup",
    "TLSInfo",
    "bind_psk",
    "bind_psk_lookup",
    "channel_binding",
    "client_context",
    "export_keying_material",
    "handshake",
    "server_context",
    "set_groups",
    "verify_connection",
    "wrap_socket",
]

_log = logging.getLogger("hybridkex.tls")

#: Seconds a blocking handshake may take by default.
DEFAULT_TIMEOUT: Final = 30.0

#: Maps a PSK identity to its key, or None when the identity is unknown.
PSKLookup = Callable[[bytes], "bytes | None"]
#: ``(connection, sent, content_type, data)`` for every TLS protocol message (22 = handshake).
MessageCallback = Callable[["SSL.Connection", bool, int, bytes], None]

Role = Literal["client", "server"]


class InsecureKeyLogWarning(UserWarning):
    """Key logging is on: anyone who reads the key-log file can decrypt the recorded traffic."""


class _ContextConfig:
    """What hybridkex configured on one Context.  Never printed: it may hold a PSK."""

    __slots__ = (
        "allowed_groups",
        "cipher",
        "cipher_id",
        "group_names",
        "identity",
        "known_groups",
        "lookup",
        "message_callback",
        "psk",
        "require_pq",
        "role",
    )

    def __init__(self, role: Role, cipher: str, allowed_groups: tuple[str, ...], require_pq: bool) -> None:
        self.role: Role = role
        self.cipher = cipher
        self.cipher_id = CIPHER_ID[cipher]
        self.allowed_groups = allowed_groups  # normalized, for comparisons
        self.group_names: tuple[str, ...] = allowed_groups  # as configured, for messages
        #: Spellings OpenSSL reports that are known to be allowed (filled as seen: the check after
        #: each handshake is then one set lookup).
        self.known_groups: set[str] = set()
        self.require_pq = require_pq
        self.identity: bytes | None = None
        self.psk: bytes | None = None
        self.lookup: PSKLookup | None = None
        self.message_callback: MessageCallback | None = None

    def __repr__(self) -> str:
        return f"<hybridkex TLS {self.role} config {self.cipher}>"


class _ConnState:
    """Per-connection state: PSK binding, what the callbacks saw, a captured callback error."""

    __slots__ = ("bound", "bound_lookup", "error", "info", "seen")

    def __init__(self) -> None:
        self.bound: tuple[bytes, bytes] | None = None
        self.bound_lookup: PSKLookup | None = None
        self.error: BaseException | None = None
        self.info: TLSInfo | None = None
        self.seen = PSKObservation()

    def __repr__(self) -> str:
        return "<hybridkex TLS connection state>"


_CONFIGS: weakref.WeakKeyDictionary[SSL.Context, _ContextConfig] = weakref.WeakKeyDictionary()
_STATES: weakref.WeakKeyDictionary[SSL.Connection, _ConnState] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _state(conn: SSL.Connection) -> _ConnState:
    with _LOCK:
        st = _STATES.get(conn)
        if st is None:
            st = _STATES[conn] = _ConnState()
        return st


def _config(conn: SSL.Connection) -> _ContextConfig:
    return _require_config(_CONFIGS.get(conn.get_context()))


def _require_config(cfg: _ContextConfig | None) -> _ContextConfig:
    if cfg is None:
        raise LocalProtocolError(
            "this connection's context was not built by hybridkex.tls.client_context()/server_context()"
        )
    return cfg


def _attach(conn: SSL.Connection, ctx: SSL.Context) -> tuple[_ContextConfig | None, _ConnState]:
    """A new connection's context configuration (None: not a hybridkex context) and its state, for
    :class:`~hybridkex.tls.MemoryTLS`, which keeps both: one lookup per connection, not one per call."""
    st = _ConnState()
    with _LOCK:
        _STATES[conn] = st
    return _CONFIGS.get(ctx), st


def _sink(conn: SSL.Connection | None, exc: BaseException) -> None:
    """Keep an exception raised inside an OpenSSL callback until the handshake call returns."""
    if conn is not None:
        st = _state(conn)
        if st.error is None:  # the first failure is the cause; later ones are consequences
            st.error = exc
    else:  # pragma: no cover - OpenSSL called back for an SSL object pyOpenSSL does not know
        _log.error("TLS callback failed outside any known connection: %s", type(exc).__name__)


# ---------------------------------------------------------------------------------------------
# Context construction
# ---------------------------------------------------------------------------------------------


def _configure_groups(
    ctx: SSL.Context, role: Role, groups: str | Sequence[str] | None, require_pq: bool
) -> tuple[str, ...]:
    if groups is None:
        text = PQ_GROUP if require_pq else (DEFAULT_CLIENT_GROUPS if role == "client" else DEFAULT_SERVER_GROUPS)
    else:
        text = groups if isinstance(groups, str) else ":".join(groups)
    names = group_names(text)
    if require_pq:
        pq_names = tuple(n for n in names if "mlkem" in n.lower())
        if not pq_names:
            raise ConfigurationError(
                f"require_pq needs a post-quantum hybrid group (e.g. {PQ_GROUP}) in the group list", field="groups"
            )
        # Listing only the hybrid groups is what makes OpenSSL refuse classical-only peers.
        names = pq_names
        text = ":".join(pq_names)
    if _shim.set_groups(ctx, text):
        return names
    if require_pq:
        raise UnsupportedAlgorithm(
            f"the OpenSSL linked by pyOpenSSL ({_shim.versions()}) does not offer {text}; "
            "X25519MLKEM768 needs OpenSSL >= 3.5 (bundled with the cryptography wheels)"
        )
    if groups is None:
        # An OpenSSL without ML-KEM (< 3.5) rejects the default list: fall back to X25519, loudly.
        _log.warning("OpenSSL (%s) has no X25519MLKEM768; TLS falls back to X25519 only", _shim.versions())
        if _shim.set_groups(ctx, "X25519"):
            return ("X25519",)
    raise ConfigurationError(f"OpenSSL rejected the group list {text!r}", field="groups")


def set_groups(ctx: SSL.Context, groups: str) -> None:
    """Set the key-exchange groups of a pyOpenSSL context, e.g. ``"X25519MLKEM768:X25519"``.

    For plain pyOpenSSL contexts (baselines, interop tests), which have no public group setter;
    :func:`client_context` / :func:`server_context` take ``groups=`` instead.

    Raises:
        ConfigurationError: OpenSSL rejects the list (e.g. a group it does not know).
    """
    if not _shim.set_groups(ctx, groups):
        raise ConfigurationError(f"OpenSSL ({_shim.versions()}) rejected the group list {groups!r}", field="groups")


def _keylog_writer(path: str | os.PathLike[str]) -> Callable[[SSL.Connection, bytes], None]:
    target = os.fspath(path)
    lock = threading.Lock()
    message = (
        f"TLS key logging is ON (writing to {target}): anyone who reads that file can decrypt the "
        "recorded traffic. Use it only for debugging, never in production."
    )
    warnings.warn(message, InsecureKeyLogWarning, stacklevel=4)
    _log.warning(message)

    def write(conn: SSL.Connection, line: bytes) -> None:
        # Called by pyOpenSSL without an error handler: it must never raise.
        try:
            with lock:
                fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line + b"\n")
                finally:
                    os.close(fd)
        except Exception as exc:
            _log.warning("cannot write TLS key log %s: %s", target, type(exc).__name__)

    return write


def _base_context(
    role: Role,
    *,
    suite: Suite | str,
    groups: str | Sequence[str] | None,
    require_pq: bool,
    keylog: str | os.PathLike[str] | None,
    message_callback: MessageCallback | None,
) -> tuple[SSL.Context, _ContextConfig]:
    cipher = resolve_cipher(suite)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD if role == "client" else SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # Only the PSK's own suite: the server must not pick a suite whose hash does not match the PSK.
    ctx.set_tls13_ciphersuites(cipher.encode("ascii"))
    # No tickets, no cache: a connection can never resume, so each one consumes a fresh PSK.
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if role == "client":
        # Fail closed if a server ignores the PSK and sends a certificate: refuse every certificate.
        ctx.set_verify(SSL.VERIFY_PEER, _refuse_certificate)
    names = _configure_groups(ctx, role, groups, require_pq)
    cfg = _ContextConfig(role, cipher, tuple(normalize_group(n) for n in names), require_pq)
    cfg.group_names = names
    cfg.message_callback = message_callback
    if message_callback is not None:
        _shim.install_msg_callback(ctx, message_callback, _sink)
    if keylog is not None:
        ctx.set_keylog_callback(_keylog_writer(keylog))
    with _LOCK:
        _CONFIGS[ctx] = cfg
    return ctx, cfg


def _refuse_certificate(conn: SSL.Connection, cert: object, errnum: int, depth: int, ok: int) -> bool:
    return False


def client_context(
    identity: bytes | str | None = None,
    psk: bytes | None = None,
    *,
    suite: Suite | str = DEFAULT_SUITE,
    groups: str | Sequence[str] | None = None,
    require_pq: bool = False,
    keylog: str | os.PathLike[str] | None = None,
    message_callback: MessageCallback | None = None,
) -> SSL.Context:
    """A pyOpenSSL client ``Context`` that authenticates with the external PSK ``(identity, psk)``.

    Args:
        identity: the PSK identity (bytes, or str encoded as UTF-8), 1..1024 bytes.  With
            ``psk``, used by every connection of the context; leave both None and call
            :func:`bind_psk` on each ``Connection`` to give each its own.
        psk: the key, 16..512 bytes.
        suite: a :class:`~hybridkex.suites.Suite` (or its name), or directly a TLS 1.3 cipher name
            (``"TLS_AES_128_GCM_SHA256"`` or ``"TLS_AES_256_GCM_SHA384"``): fixes the PSK hash.
        groups: OpenSSL group list; default ``"*X25519MLKEM768:*X25519"`` (both key shares sent).
        require_pq: offer and accept only X25519MLKEM768 (fails against classical-only servers).
        keylog: path of an SSLKEYLOGFILE-format file to append secrets to (debugging only; warns).
        message_callback: observes every protocol message (wire-level checks and debugging).

    Raises:
        ConfigurationError, InvalidKeyMaterial: bad arguments (the key is never echoed).
        UnsupportedAlgorithm: the OpenSSL in use lacks a required algorithm.
    """
    if (identity is None) != (psk is None):
        raise ConfigurationError("give both identity and psk, or neither (then bind_psk() per connection)",
                                 field="identity" if identity is None else "psk")
    ctx, cfg = _base_context(
        "client", suite=suite, groups=groups, require_pq=require_pq, keylog=keylog, message_callback=message_callback
    )
    if identity is not None and psk is not None:
        cfg.identity = check_identity(identity)
        cfg.psk = check_psk(psk)

    def provide(conn: SSL.Connection) -> tuple[bytes, bytes, bytes] | None:
        st = _state(conn)
        if st.bound is not None:
            ident, key = st.bound
        elif cfg.identity is not None and cfg.psk is not None:
            ident, key = cfg.identity, cfg.psk
        else:
            raise ConfigurationError(
                "no PSK for this connection: pass identity and psk to client_context() or call bind_psk()",
                field="psk",
            )
        st.seen.identity_offered = True
        st.seen.used_identity = ident
        return ident, key, cfg.cipher_id

    _shim.install_psk_use_session(ctx, provide, _sink)
    return ctx


def server_context(
    psk_lookup: PSKLookup | Mapping[bytes, bytes] | None = None,
    *,
    suite: Suite | str = DEFAULT_SUITE,
    groups: str | Sequence[str] | None = None,
    require_pq: bool = False,
    keylog: str | os.PathLike[str] | None = None,
    message_callback: MessageCallback | None = None,
) -> SSL.Context:
    """A pyOpenSSL server ``Context`` that accepts clients holding an external PSK.

    Args:
        psk_lookup: maps an identity (bytes) to its key (16..512 bytes) or None for "unknown";
            a ``Mapping`` works too.  Called inside the handshake; an exception it raises fails
            that handshake and is re-raised by :func:`handshake` / :func:`verify_connection`.
            A ``Connection`` bound with :func:`bind_psk` / :func:`bind_psk_lookup` uses its own
            binding instead.
        suite: as for :func:`client_context`; every PSK of this context is bound to its hash.
        groups: OpenSSL group list; default ``"X25519MLKEM768:X25519"`` (hybrid preferred).
        require_pq: list only X25519MLKEM768, so classical-only clients fail, and reject any other
            group after the handshake.
        keylog, message_callback: as for :func:`client_context`.
    """
    ctx, cfg = _base_context(
        "server", suite=suite, groups=groups, require_pq=require_pq, keylog=keylog, message_callback=message_callback
    )
    if isinstance(psk_lookup, Mapping):
        table = dict(psk_lookup)
        cfg.lookup = table.get
    else:
        cfg.lookup = psk_lookup

    def find(conn: SSL.Connection, identity: bytes) -> tuple[bytes, bytes] | None:
        st = _state(conn)
        st.seen.identity_offered = True
        key: bytes | None
        if st.bound is not None:
            # Constant time: the bound identity may itself be derived from secret material.
            key = st.bound[1] if hmac.compare_digest(identity, st.bound[0]) else None
        elif st.bound_lookup is not None:
            key = st.bound_lookup(identity)
        elif cfg.lookup is not None:
            key = cfg.lookup(identity)
        else:
            key = None
        if key is None:
            return None
        key = check_psk(key, field_name="the key psk_lookup returned")
        st.seen.identity_found = True
        st.seen.used_identity = identity
        return key, cfg.cipher_id

    _shim.install_psk_find_session(ctx, find, _sink)
    return ctx


def bind_psk(conn: SSL.Connection, identity: bytes | str, psk: bytes) -> None:
    """Give ``conn`` its own external PSK, overriding its context's (call before the handshake).

    On a client connection it is the PSK offered; on a server connection it is the only identity
    accepted (compared in constant time).
    """
    _config(conn)
    _bind(_state(conn), identity, psk)


def _bind(st: _ConnState, identity: bytes | str, psk: bytes) -> None:
    _require_not_started(st)
    st.bound = (check_identity(identity), check_psk(psk))
    st.bound_lookup = None


def _require_not_started(st: _ConnState) -> None:
    if st.seen.identity_offered or st.info is not None:
        raise LocalProtocolError("a PSK must be bound before the connection's handshake starts")


def bind_psk_lookup(conn: SSL.Connection, psk_lookup: PSKLookup) -> None:
    """Give a server ``conn`` its own identity -> key lookup, overriding its context's."""
    if _config(conn).role != "server":
        raise LocalProtocolError("bind_psk_lookup() is for server connections; use bind_psk() on a client")
    st = _state(conn)
    _require_not_started(st)
    st.bound = None
    st.bound_lookup = psk_lookup


# ---------------------------------------------------------------------------------------------
# Handshake and verification
# ---------------------------------------------------------------------------------------------


def _reasons(exc: SSL.Error) -> list[str]:
    if isinstance(exc, SSL.SysCallError):
        code = exc.args[0] if exc.args else -1
        if code in (-1, 0):
            return ["unexpected eof"]
        name = str(exc.args[1]) if len(exc.args) > 1 else str(code)
        if name in ("ECONNRESET", "EPIPE", "ECONNABORTED"):
            return [f"connection reset ({name})"]
        return [f"socket error {name}"]
    first = exc.args[0] if exc.args else None
    if isinstance(first, list):
        return [str(item[2]) if isinstance(item, tuple) and len(item) == 3 else str(item) for item in first]
    return [str(a) for a in exc.args]


def _raise_captured(st: _ConnState) -> None:
    if st.error is not None:
        err, st.error = st.error, None
        raise err


def _translate_error(conn: SSL.Connection, exc: SSL.Error, *,
                     established: bool = False) -> HybridKEXError | BaseException:
    """The error to raise for ``exc`` from ``conn``: a captured callback exception first, else the
    typed translation of OpenSSL's reasons.

    ``established``: the failure came after our side finished the handshake.  The peer had
    accepted our PSK by then, so no PSK diagnosis applies: the records (or our Finished, which the
    client sends last) were altered in transit, or the peer failed.
    """
    st = _state(conn)
    if st.error is not None:
        err, st.error = st.error, None
        return err
    if established:
        reasons = "; ".join(r for r in _reasons(exc) if r) or "no reason given"
        return TLSError(f"the TLS connection failed after the handshake ({reasons}): data or our Finished "
                        "message was altered in transit, or the peer failed; the connection is closed")
    cfg = _CONFIGS.get(conn.get_context())
    return translate(
        _reasons(exc),
        role=cfg.role if cfg else "client",
        seen=st.seen,
        groups=cfg.group_names if cfg else (),
        cipher=cfg.cipher if cfg else None,
    )


def _do_handshake(conn: SSL.Connection) -> None:
    """One ``do_handshake()`` call; WantRead/WantWrite pass through, failures become typed errors
    (:meth:`hybridkex.tls.MemoryTLS.do_handshake` has the same, inline)."""
    try:
        conn.do_handshake()
    except (SSL.WantReadError, SSL.WantWriteError):
        _raise_captured(_state(conn))
        raise
    except SSL.Error as exc:
        raise _translate_error(conn, exc) from exc


def verify_connection(conn: SSL.Connection) -> TLSInfo:
    """Check a finished handshake and describe it; raise :class:`TLSError` on any violation.

    Asserts: TLS 1.3; the PSK's cipher suite; a key-exchange group was negotiated (fresh (EC)DHE or
    hybrid: psk_dhe_ke, never psk_ke) and is one the context allows (X25519MLKEM768 under
    ``require_pq``); no certificate on either side; the external PSK was really used.  Also
    re-raises an exception captured inside a PSK or message callback.
    """
    return _verify(conn, _config(conn), _state(conn))


def _verify(conn: SSL.Connection, cfg: _ContextConfig, st: _ConnState) -> TLSInfo:
    _raise_captured(st)
    if conn.get_protocol_version() != SSL.TLS1_3_VERSION:  # the number: no string made when it is 1.3
        raise TLSError(f"negotiated {conn.get_protocol_version_name()}, but only TLSv1.3 is allowed")
    version = "TLSv1.3"
    cipher = conn.get_cipher_name()
    if cipher != cfg.cipher:
        raise TLSError(f"negotiated cipher suite {cipher}, but the PSK is bound to {cfg.cipher}")
    group = conn.get_group_name()
    if group is None:
        raise TLSError("no (EC)DHE key exchange took place (psk_ke): every connection must use psk_dhe_ke")
    if group not in cfg.known_groups:
        if normalize_group(group) not in cfg.allowed_groups:
            raise TLSError(
                f"negotiated key-exchange group {group} is not allowed here (allowed: {', '.join(cfg.group_names)})"
            )
        with _LOCK:
            cfg.known_groups.add(group)
    if conn.get_peer_certificate() is not None or conn.get_certificate() is not None:
        raise TLSError("a certificate was used in a handshake that must rely on the external PSK only")
    if not _shim.session_reused(conn) or st.seen.used_identity is None:
        raise TLSError("the handshake did not use the external PSK")
    info = TLSInfo(cfg.role, version, cipher, group, st.seen.used_identity)  # role, version, cipher, group, identity
    st.info = info
    return info


def _wait(conn: SSL.Connection, for_write: bool, deadline: float | None, timeout: float | None) -> None:
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        raise HandshakeTimeout(f"TLS handshake did not finish within {timeout:g} s")
    fd = conn.fileno()
    readable, writable, _ = select.select([] if for_write else [fd], [fd] if for_write else [], [], remaining)
    if not readable and not writable:
        raise HandshakeTimeout(f"TLS handshake did not finish within {timeout:g} s")


def handshake(conn: SSL.Connection, *, timeout: float | None = DEFAULT_TIMEOUT) -> TLSInfo:
    """Run the handshake of a socket-backed ``conn`` (connect or accept state already set) within
    ``timeout`` seconds, then :func:`verify_connection`.  The socket's own timeout is restored.

    Raises:
        HandshakeTimeout: the deadline passed.
        PSKRejected and subclasses, TLSError: the handshake failed or violates the checks.
        Whatever ``psk_lookup`` raised inside the handshake.

    The socket is left open on failure; the caller closes it.
    """
    if timeout is not None and timeout <= 0:
        raise ConfigurationError("must be positive or None", field="timeout")
    previous = conn.gettimeout()
    deadline = None if timeout is None else time.monotonic() + timeout
    conn.setblocking(False)
    try:
        while True:
            try:
                _do_handshake(conn)
                break
            except SSL.WantReadError:
                _wait(conn, False, deadline, timeout)
            except SSL.WantWriteError:
                _wait(conn, True, deadline, timeout)
    finally:
        with contextlib.suppress(OSError):  # the socket was closed under us; the handshake error says why
            conn.settimeout(previous)
    return verify_connection(conn)


def wrap_socket(
    ctx: SSL.Context,
    sock: socket.socket,
    *,
    server_side: bool,
    timeout: float | None = DEFAULT_TIMEOUT,
    psk: tuple[bytes | str, bytes] | None = None,
) -> tuple[SSL.Connection, TLSInfo]:
    """Wrap a connected socket, handshake within ``timeout`` and verify: ``(connection, info)``.

    ``psk=(identity, key)`` binds a per-connection PSK first (see :func:`bind_psk`).
    """
    role = _CONFIGS.get(ctx)
    if role is None:
        raise LocalProtocolError("the context was not built by hybridkex.tls.client_context()/server_context()")
    if (role.role == "server") != server_side:
        raise LocalProtocolError(f"a {role.role} context cannot be used with server_side={server_side}")
    conn = SSL.Connection(ctx, sock)
    if psk is not None:
        bind_psk(conn, *psk)
    if server_side:
        conn.set_accept_state()
    else:
        conn.set_connect_state()
    return conn, handshake(conn, timeout=timeout)


def export_keying_material(
    conn: SSL.Connection, label: bytes, length: int, context: bytes | None = None
) -> bytes:
    """RFC 8446 section 7.5 exporter (RFC 5705 interface) of a verified connection."""
    info = _state(conn).info
    if info is None:
        raise LocalProtocolError("keying material can only be exported after verify_connection() succeeded")
    if not isinstance(label, bytes) or not label:
        raise ConfigurationError("must be non-empty bytes", field="label")
    limit = 255 * (48 if info.cipher.endswith("SHA384") else 32)  # HKDF-Expand's output limit
    if not 1 <= length <= limit:
        raise ConfigurationError(f"must be 1..{limit}", field="length")
    try:
        return bytes(conn.export_keying_material(label, length, context))
    except SSL.Error as exc:
        raise TLSError(f"TLS exporter failed: {', '.join(_reasons(exc)) or 'no reason'}") from exc


def channel_binding(conn: SSL.Connection) -> bytes:
    """RFC 9266 ``tls-exporter`` channel binding: 32 bytes, label ``EXPORTER-Channel-Binding``, no context."""
    return export_keying_material(conn, EXPORTER_LABEL, EXPORTER_LENGTH)
