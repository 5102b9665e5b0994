"""The one module that touches private pyOpenSSL / cryptography bindings.

pyOpenSSL has no public PSK API (declined upstream, pyca/pyopenssl#704).  The TLS 1.3 external-PSK
callbacks are reachable through ``OpenSSL._util.lib`` (cryptography's cffi bindings, kept "to allow
SSL.Context patching"), plus three pyOpenSSL internals: ``Context._context`` (the ``SSL_CTX*``),
``Connection._ssl`` (the ``SSL*``) and ``Connection._reverse_mapping`` (``SSL*`` -> ``Connection``).
Everything private is confined here and checked at import, so a dependency bump that drops a
binding fails loudly with :class:`~hybridkex.exceptions.UnsupportedAlgorithm` instead of crashing
in a handshake.

Lifetimes: cffi callbacks are stored per ``Context`` (weakly keyed), so they live exactly as long as
the ``SSL_CTX`` that calls them (every ``Connection`` holds its ``Context``).  ``SSL_SESSION``
objects built here are handed to OpenSSL, which owns and frees them.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

from ..exceptions import UnsupportedAlgorithm

SUPPORTED_RANGES: Final = "pyOpenSSL >= 26.2, < 27 with cryptography >= 49, < 51"
_INSTALL_HINT: Final = f"install {SUPPORTED_RANGES} (pip install 'pyOpenSSL>=26.2,<27' 'cryptography>=49,<51')"

try:
    import cryptography
    import OpenSSL
    from OpenSSL import SSL
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise UnsupportedAlgorithm(
        f"the pyOpenSSL TLS adapter needs pyOpenSSL and cryptography ({exc.name or exc} is missing); "
        f"{_INSTALL_HINT}"
    ) from exc

__all__ = [
    "FAST_IO",
    "READ_CLOSED",
    "READ_ERROR",
    "READ_MORE",
    "SUPPORTED_RANGES",
    "check_bindings",
    "fast_io",
    "feed",
    "install_msg_callback",
    "install_psk_find_session",
    "install_psk_use_session",
    "pending_output",
    "read_records",
    "session_reused",
    "set_groups",
    "versions",
    "write_records",
]

_log = logging.getLogger(__name__)

#: cffi functions this module calls.
REQUIRED_FUNCTIONS: Final = (
    "SSL_CTX_set_psk_use_session_callback",
    "SSL_CTX_set_psk_find_session_callback",
    "Cryptography_SSL_SESSION_new",
    "SSL_SESSION_set1_master_key",
    "SSL_SESSION_set_cipher",
    "SSL_SESSION_set_protocol_version",
    "SSL_SESSION_free",
    "SSL_CIPHER_find",
    "SSL_CTX_set1_curves_list",
    "SSL_CTX_set_msg_callback",
    "SSL_session_reused",
    "TLS1_3_VERSION",
)
#: Feature flags that must be 1.
REQUIRED_FLAGS: Final = ("Cryptography_HAS_PSK", "Cryptography_HAS_PSK_TLSv1_3")
#: Public pyOpenSSL methods the adapter relies on (added in pyOpenSSL 26.0 / earlier).
REQUIRED_PUBLIC: Final = (
    ("Connection", "get_group_name"),
    ("Connection", "export_keying_material"),
    ("Context", "set_keylog_callback"),
    ("Context", "set_tls13_ciphersuites"),
)


def versions() -> str:
    """Installed pyOpenSSL / cryptography / OpenSSL versions, for messages and reports."""
    linked = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")
    return f"pyOpenSSL {OpenSSL.__version__}, cryptography {cryptography.__version__}, {linked}"


def check_bindings(lib: Any, ssl_module: Any) -> None:
    """Raise :class:`UnsupportedAlgorithm` unless ``lib`` and ``ssl_module`` provide every private
    binding this module uses.  Run at import on the real ``OpenSSL._util.lib`` and ``OpenSSL.SSL``."""
    missing = [name for name in REQUIRED_FUNCTIONS if not hasattr(lib, name)]
    missing += [name for name in REQUIRED_FLAGS if not getattr(lib, name, 0)]
    missing += [
        f"{cls}.{attr}" for cls, attr in REQUIRED_PUBLIC if not hasattr(getattr(ssl_module, cls, None), attr)
    ]
    conn_cls = getattr(ssl_module, "Connection", None)
    if not isinstance(getattr(conn_cls, "_reverse_mapping", None), weakref.WeakValueDictionary):
        missing.append("Connection._reverse_mapping")
    if not missing:
        probe = ssl_module.Context(ssl_module.TLS_METHOD)
        if getattr(probe, "_context", None) is None:
            missing.append("Context._context")
        elif getattr(ssl_module.Connection(probe, None), "_ssl", None) is None:
            missing.append("Connection._ssl")
    if missing:
        raise UnsupportedAlgorithm(
            "the installed pyOpenSSL/cryptography lack bindings the TLS 1.3 external-PSK adapter needs "
            f"({', '.join(missing)}); found {_safe_versions()}; supported: {SUPPORTED_RANGES}"
        )


def _safe_versions() -> str:
    try:
        return versions()
    except Exception:  # a broken install must still produce the UnsupportedAlgorithm message
        return "unknown versions"


check_bindings(_lib, SSL)

# Per-Context references that must outlive every handshake on that context (cffi callbacks).
_KEEP: weakref.WeakKeyDictionary[SSL.Context, list[object]] = weakref.WeakKeyDictionary()
_KEEP_LOCK = threading.Lock()
# Per-Connection identity buffers handed to OpenSSL by the client callback.
_ID_BUFFERS: weakref.WeakKeyDictionary[SSL.Connection, object] = weakref.WeakKeyDictionary()

ErrorSink = Callable[["SSL.Connection | None", BaseException], None]
#: Client: Connection -> (identity, key, 2-byte cipher id), or None to offer no PSK.
UseSession = Callable[["SSL.Connection"], "tuple[bytes, bytes, bytes] | None"]
#: Server: (Connection, identity) -> (key, 2-byte cipher id), or None for an unknown identity.
FindSession = Callable[["SSL.Connection", bytes], "tuple[bytes, bytes] | None"]
#: (Connection, sent, content_type, message bytes).
MessageCallback = Callable[["SSL.Connection", bool, int, bytes], None]


def _keep(ctx: SSL.Context, *objs: object) -> None:
    with _KEEP_LOCK:
        _KEEP.setdefault(ctx, []).extend(objs)


def _connection(ssl: Any) -> SSL.Connection | None:
    return SSL.Connection._reverse_mapping.get(ssl)


def _on_cffi_error(exc_type: Any, exc_value: Any, tb: Any) -> None:
    # Last resort for a failure inside our own wrapper (the wrappers catch everything else): never
    # let cffi print a traceback to stderr. The callback then returns 0, failing the handshake.
    _log.error("internal error in a TLS PSK callback: %s", getattr(exc_type, "__name__", exc_type))


def _new_session(ssl: Any, key: bytes, cipher_id: bytes) -> Any:
    """A TLS 1.3 ``SSL_SESSION`` carrying ``key`` bound to ``cipher_id``; caller owns it."""
    cipher = _lib.SSL_CIPHER_find(ssl, cipher_id)
    if cipher == _ffi.NULL:
        raise UnsupportedAlgorithm(f"OpenSSL does not know TLS 1.3 cipher {cipher_id.hex()}")
    sess = _lib.Cryptography_SSL_SESSION_new()
    if sess == _ffi.NULL:
        raise MemoryError("SSL_SESSION_new failed")
    ok = (
        _lib.SSL_SESSION_set1_master_key(sess, key, len(key)) == 1
        and _lib.SSL_SESSION_set_cipher(sess, cipher) == 1
        and _lib.SSL_SESSION_set_protocol_version(sess, _lib.TLS1_3_VERSION) == 1
    )
    if not ok:
        _lib.SSL_SESSION_free(sess)
        raise UnsupportedAlgorithm("OpenSSL refused to build a TLS 1.3 PSK session (key length or cipher)")
    return sess


def install_psk_use_session(ctx: SSL.Context, provide: UseSession, sink: ErrorSink) -> None:
    """Client side: offer the external PSK ``provide(connection)`` returns.

    OpenSSL calls this again after a HelloRetryRequest (with ``md`` set); the same session is built
    again, which matches because the client enables only that session's cipher suite.
    """
    def callback(ssl: Any, md: Any, id_out: Any, idlen_out: Any, sess_out: Any) -> int:
        conn = None
        try:
            conn = _connection(ssl)
            if conn is None:
                raise RuntimeError("TLS callback for an unknown connection")
            offer = provide(conn)
            if offer is None:
                sess_out[0] = _ffi.NULL
                return 1
            identity, key, cipher_id = offer
            buf = _ffi.new("unsigned char[]", identity)
            # OpenSSL copies the identity only after this callback returns: keep the buffer alive as
            # long as the connection (per connection, so concurrent handshakes cannot free it).
            with _KEEP_LOCK:
                _ID_BUFFERS[conn] = buf
            sess_out[0] = _new_session(ssl, key, cipher_id)
            id_out[0] = buf
            idlen_out[0] = len(identity)
            return 1
        except BaseException as exc:  # re-raised after the handshake, never printed
            sink(conn, exc)
            return 0

    cb = _ffi.callback(
        "int(*)(SSL *, EVP_MD *, unsigned char **, size_t *, SSL_SESSION **)",
        callback,
        onerror=_on_cffi_error,
    )
    _keep(ctx, cb)
    _lib.SSL_CTX_set_psk_use_session_callback(ctx._context, cb)


def install_psk_find_session(ctx: SSL.Context, find: FindSession, sink: ErrorSink) -> None:
    """Server side: accept an identity the client offers when ``find(connection, identity)`` knows it.

    OpenSSL also calls this with ticket identities; unknown ones get ``*sess = NULL`` and 1 (0 would
    abort the handshake).
    """

    def callback(ssl: Any, identity: Any, identity_len: int, sess_out: Any) -> int:
        conn = None
        try:
            conn = _connection(ssl)
            if conn is None:
                raise RuntimeError("TLS callback for an unknown connection")
            found = find(conn, bytes(_ffi.buffer(identity, identity_len)))
            if found is None:
                sess_out[0] = _ffi.NULL
                return 1
            key, cipher_id = found
            sess_out[0] = _new_session(ssl, key, cipher_id)
            return 1
        except BaseException as exc:  # re-raised after the handshake, never printed
            sink(conn, exc)
            return 0

    cb = _ffi.callback(
        "int(*)(SSL *, unsigned char *, size_t, SSL_SESSION **)", callback, onerror=_on_cffi_error
    )
    _keep(ctx, cb)
    _lib.SSL_CTX_set_psk_find_session_callback(ctx._context, cb)


def install_msg_callback(ctx: SSL.Context, observe: MessageCallback, sink: ErrorSink) -> None:
    """Call ``observe(connection, sent, content_type, data)`` for every protocol message (wire checks)."""

    def callback(  # noqa: PLR0917 - the C signature of SSL_CTX_set_msg_callback
        write_p: int, version: int, content_type: int, buf: Any, length: int, ssl: Any, arg: Any
    ) -> None:
        conn = None
        try:
            conn = _connection(ssl)
            if conn is not None:
                observe(conn, bool(write_p), content_type, bytes(_ffi.buffer(buf, length)))
        except BaseException as exc:
            sink(conn, exc)

    cb = _ffi.callback(
        "void(*)(int, int, int, void *, size_t, SSL *, void *)", callback, onerror=_on_cffi_error
    )
    _keep(ctx, cb)
    _lib.SSL_CTX_set_msg_callback(ctx._context, cb)


def set_groups(ctx: SSL.Context, groups: str) -> bool:
    """Set the key-exchange groups (``SSL_CTX_set1_groups_list``); False if OpenSSL rejects the list."""
    return bool(_lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode("ascii")) == 1)


def session_reused(conn: SSL.Connection) -> bool:
    """``SSL_session_reused``: 1 for every PSK handshake (external PSK or ticket)."""
    return bool(_lib.SSL_session_reused(conn._ssl) == 1)


# -- memory-BIO record I/O without exceptions (the tunnel's data path) -------------------------------
#
# pyOpenSSL signals "no more data" by raising WantReadError, which costs more than the record itself
# for small messages (issue 15's profile).  These call OpenSSL directly and report the status instead;
# any real error is left for pyOpenSSL's own methods to raise (the caller retries through them).

_FAST_FUNCTIONS: Final = ("SSL_read", "SSL_write", "SSL_get_error", "BIO_read", "BIO_write", "BIO_get_mem_data",
                          "SSL_ERROR_WANT_READ", "SSL_ERROR_ZERO_RETURN")
FAST_IO: Final = all(hasattr(_lib, name) for name in _FAST_FUNCTIONS)
_alloc = _ffi.new_allocator(should_clear_after_alloc=False)
_RECORD: Final = 16384  # the most plaintext one TLS record carries: what one SSL_read returns
# BIO_get_mem_data's out-parameter; only its return value (the byte count) is used, so threads
# sharing it race on a pointer nobody reads.
_MEM_PTR: Final = _ffi.new("char **") if FAST_IO else None
_MAX_READ: Final = 1 << 30

#: :func:`read_records` status values.
READ_MORE, READ_CLOSED, READ_ERROR = 0, 1, 2


def fast_io(conn: SSL.Connection) -> bool:
    """Whether ``conn`` is a memory-BIO connection the functions below can drive."""
    return (FAST_IO and getattr(conn, "_ssl", None) is not None and getattr(conn, "_into_ssl", None) is not None
            and getattr(conn, "_from_ssl", None) is not None)


def feed(conn: SSL.Connection, data: bytes) -> bool:
    """Put ``data`` (non-empty ``bytes``) into the incoming BIO; False if it went in not at all
    (another type, or an error): then ``conn.bio_write`` does it or raises.  A memory BIO takes a
    write whole or not at all, so False never follows a partial write."""
    return type(data) is bytes and _lib.BIO_write(conn._into_ssl, data, len(data)) == len(data)


_local = threading.local()


def _read_buffer() -> Any:
    """This thread's record buffer: SSL_read decrypts into it and the plaintext is copied out at
    once, so one per thread serves every connection (not one allocation per call)."""
    buf = getattr(_local, "record", None)
    if buf is None:
        buf = _local.record = _alloc("char[]", _RECORD)
    return buf


def read_records(conn: SSL.Connection, data: bytes) -> tuple[list[bytes], int]:
    """Feed ``data`` (may be empty) and decrypt every complete record: (plaintexts, status).

    Status :data:`READ_MORE`: needs more data; :data:`READ_CLOSED`: the peer's close_notify;
    :data:`READ_ERROR`: something else (call ``conn.recv`` to get the error raised)."""
    if data and _lib.BIO_write(conn._into_ssl, data, len(data)) != len(data):
        return [], READ_ERROR
    ssl = conn._ssl
    buf = _read_buffer()
    out = []
    while True:
        n = _lib.SSL_read(ssl, buf, _RECORD)
        if n > 0:
            out.append(_ffi.unpack(buf, n))
            continue
        code = _lib.SSL_get_error(ssl, n)
        if code == _lib.SSL_ERROR_WANT_READ:
            return out, READ_MORE
        return out, READ_CLOSED if code == _lib.SSL_ERROR_ZERO_RETURN else READ_ERROR


def write_records(conn: SSL.Connection, data: bytes) -> int:
    """Encrypt ``data`` into the outgoing BIO; how many bytes were taken (fewer only on an error:
    send the rest with ``conn.sendall`` to get it raised).  pyOpenSSL enables partial writes, so
    OpenSSL takes a record's worth per call."""
    ssl = conn._ssl
    done, total = 0, len(data)
    with _ffi.from_buffer(data) as view:
        while done < total:
            n = _lib.SSL_write(ssl, view + done, total - done)
            if n <= 0:
                break
            done += n
    return done


def pending_size(conn: SSL.Connection) -> int:
    """How many bytes wait in the outgoing BIO: one C call, no buffer (the relay asks after every
    record it decrypts, and almost always the answer is 0)."""
    return int(_lib.BIO_get_mem_data(conn._from_ssl, _MEM_PTR))


def pending_output(conn: SSL.Connection) -> bytes:
    """Every byte waiting in the outgoing BIO (``b""`` when empty), in one read of exactly that size."""
    bio = conn._from_ssl
    n = _lib.BIO_get_mem_data(bio, _MEM_PTR)
    if n <= 0:
        return b""
    if n > _MAX_READ:  # BIO_read takes an int: gigabytes queued by a caller go in pieces
        chunks = []
        while (n := _lib.BIO_get_mem_data(bio, _MEM_PTR)) > 0:
            chunks.append(_read_exactly(bio, min(n, _MAX_READ)))
        return b"".join(chunks)
    return _read_exactly(bio, n)


def _read_exactly(bio: Any, n: int) -> bytes:
    buf = _alloc("char[]", n)
    got = _lib.BIO_read(bio, buf, n)
    return _ffi.unpack(buf, got) if got > 0 else b""


def encrypt(conn: SSL.Connection, data: bytes) -> tuple[int, bytes]:
    """:func:`write_records` then :func:`pending_output` in one call: (bytes taken, records)."""
    return write_records(conn, data), pending_output(conn)
