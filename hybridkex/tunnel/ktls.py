"""kTLS: detected and reported, never required, not used by the tunnel (issue 15).

kTLS moves TLS record encryption into the kernel: after the handshake, the TLS library hands the
session keys to the socket (Linux: the ``tls`` TCP upper-layer protocol) and the data path becomes
plain ``send``/``recv``/``sendfile`` on an encrypting socket.  Three things decide whether the
tunnel could use it, and this module answers each without ever raising:

* **the kernel**: the real test is attaching the ``tls`` ULP to a connected loopback TCP socket
  (``setsockopt(IPPROTO_TCP, TCP_ULP, b"tls")``; Linux refuses it on a socket that is not
  connected).  ``ENOENT`` means the kernel has no ``tls`` module (or may not load it); ``EOPNOTSUPP``
  / ``ENOPROTOOPT`` that it has no TCP ULPs at all.  ``/proc/sys/net/ipv4/tcp_available_ulp`` (the
  ULPs loaded so far) is read when readable, as a detail only: a module the kernel loads on first
  use is not listed before that.  The probe may load the module, as any kTLS program's first
  socket would.
* **OpenSSL, through pyOpenSSL**: OpenSSL drives kTLS when it owns the socket and
  ``SSL_OP_ENABLE_KTLS`` is set, and only if it was built with kTLS.  pyOpenSSL offers no public
  name for that option and no way to ask whether the build supports it, so the answer is "not
  exposed by pyOpenSSL" (a later pyOpenSSL that adds ``SSL.OP_ENABLE_KTLS`` is reported as such).
* **the tunnel**: its TLS runs on memory BIOs (:class:`hybridkex.tls.MemoryTLS`): OpenSSL never
  sees the socket, so there is no socket to hand the keys to, whatever the kernel offers.

The answer is computed once per process (:func:`ktls_status`) and appears as ``ktls`` in the
tunnel's ``listening`` log line and in the benchmarks' ``machine`` section.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

import OpenSSL
from OpenSSL import SSL

__all__ = ["NOT_USED", "KTLSStatus", "detect", "ktls_status", "probe_kernel", "probe_openssl"]

#: ``TCP_ULP`` from <linux/tcp.h>; the socket module does not name it.
TCP_ULP: Final = 31
ULP_FILE: Final = Path("/proc/sys/net/ipv4/tcp_available_ulp")
MODULES_DIR: Final = Path("/lib/modules")
_PROBE_TIMEOUT: Final = 2.0

NOT_USED: Final = ("the tunnel's TLS runs on memory BIOs: OpenSSL never owns the socket, so it has no "
                   "socket to hand the record keys to")

KernelAnswer = Literal["available", "unavailable", "unknown"]


@dataclass(frozen=True)
class KTLSStatus:
    """What this process found out about kTLS (no secrets: only facts about the platform)."""

    #: Whether the kernel attaches the ``tls`` TCP ULP to a connected TCP socket.
    kernel: KernelAnswer
    #: Why, in a few words (``kernel has no tls ULP``, ``unknown`` reasons ...).
    kernel_reason: str
    #: How the answer was found (the probe's result and ``tcp_available_ulp``).
    kernel_detail: str
    #: Whether the OpenSSL that pyOpenSSL uses could be asked to drive kTLS, through public API.
    openssl: str
    #: Whether the tunnel uses kTLS: never, today (see :data:`NOT_USED`).
    used: bool
    #: Why it is not used.
    not_used_reason: str

    @property
    def summary(self) -> str:
        """One line for logs and reports."""
        if self.kernel == "unavailable":
            return f"unavailable: {self.kernel_reason}"
        if self.kernel == "unknown":
            return f"unknown: {self.kernel_reason}"
        return "available in the kernel, not used: the tunnel's TLS runs on memory BIOs"

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, **asdict(self)}


def _ulp_file(path: Path) -> str:
    try:
        listed = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError) as exc:
        return f"{path.name}: not readable ({type(exc).__name__})"
    return f"{path.name}: {' '.join(listed) or '(empty)'}"


def _tls_module_installed(modules_dir: Path) -> bool:
    """Whether this kernel's module list names a ``tls`` module (so ``modprobe tls`` could load it)."""
    try:
        dep = (modules_dir / os.uname().release / "modules.dep").read_text(encoding="utf-8", errors="replace")
    except (OSError, AttributeError):
        return False
    return any(line.split(":", 1)[0].rsplit("/", 1)[-1].split(".ko", 1)[0] == "tls" for line in dep.splitlines())


def _connected_pair(host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    """A listener and both ends of one TCP connection to it on ``host`` (closed by the caller)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.settimeout(_PROBE_TIMEOUT)
        listener.bind((host, 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname()[:2], timeout=_PROBE_TIMEOUT)
        try:
            server, _ = listener.accept()
        except BaseException:
            client.close()
            raise
    except BaseException:
        listener.close()
        raise
    return listener, client, server


def probe_kernel(host: str = "127.0.0.1", ulp_file: Path = ULP_FILE,
                 modules_dir: Path = MODULES_DIR) -> tuple[KernelAnswer, str, str]:
    """(answer, reason, detail) for the kernel's ``tls`` ULP; never raises.

    ``host`` is where the probe's TCP connection is made (a loopback address); an address the probe
    cannot use makes the answer ``unknown``, as any other failure to run the probe does.  When the
    kernel refuses the ULP but its module list (``modules_dir``) has a ``tls`` module, the reason
    says so: the kernel loads it on first use only for a process with ``CAP_NET_ADMIN``.
    """
    listed = _ulp_file(ulp_file)
    if not sys.platform.startswith("linux"):
        return "unavailable", f"not Linux ({sys.platform}): the probe knows Linux's tls ULP only", listed
    try:
        sockets = _connected_pair(host)
    except Exception as exc:  # detection must not raise: a failure is an answer
        return "unknown", f"cannot open a TCP connection on {host} to probe: {exc}", listed
    try:
        sockets[1].setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        detail = f"setsockopt(TCP_ULP, 'tls') on a connected TCP socket: {name}; {listed}"
        if exc.errno == errno.ENOENT:
            if _tls_module_installed(modules_dir):
                return ("unavailable", "kernel has no tls ULP loaded (a tls module is installed: modprobe tls "
                        "loads it)", detail)
            return "unavailable", "kernel has no tls ULP", detail
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            return "unavailable", "kernel has no TCP ULP support", detail
        return "unknown", f"setsockopt(TCP_ULP, 'tls') failed: {name}", detail
    except Exception as exc:
        return "unknown", f"setsockopt(TCP_ULP, 'tls') failed: {exc}", listed
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
    return "available", "kernel attaches the tls ULP", f"setsockopt(TCP_ULP, 'tls') succeeded; {listed}"


def probe_openssl() -> str:
    """Whether the OpenSSL that pyOpenSSL uses could be told to drive kTLS, by public API only."""
    try:
        version = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")
    except Exception as exc:
        return f"unknown: pyOpenSSL cannot say which OpenSSL it uses ({type(exc).__name__})"
    if getattr(SSL, "OP_ENABLE_KTLS", None) is None:
        return (f"not exposed by pyOpenSSL {OpenSSL.__version__} (no SSL.OP_ENABLE_KTLS, no way to ask "
                f"whether {version} was built with kTLS)")
    return (f"SSL.OP_ENABLE_KTLS exposed by pyOpenSSL {OpenSSL.__version__}; whether {version} was built "
            "with kTLS is not exposed")


def detect(host: str = "127.0.0.1", ulp_file: Path = ULP_FILE, modules_dir: Path = MODULES_DIR) -> KTLSStatus:
    """Probe now (uncached; :func:`ktls_status` is the cached answer); never raises."""
    try:
        kernel, reason, detail = probe_kernel(host, ulp_file, modules_dir)
    except Exception as exc:  # belt and braces: probe_kernel handles its own failures
        kernel, reason, detail = "unknown", f"probe failed: {exc}", ""
    return KTLSStatus(kernel, reason, detail, probe_openssl(), False, NOT_USED)


@functools.cache
def ktls_status() -> KTLSStatus:
    """This process's answer, computed on first call (a few system calls) and cached; never raises."""
    return detect()
