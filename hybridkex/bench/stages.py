"""Where a hybridkex handshake spends its time: a per-stage breakdown measured in place.

:class:`StageClock` attributes wall time (one thread drives both ends, so wall time is CPU time
plus any wait for the KME) to the innermost active stage.  Stages:

=============  ===============================================================================
``kem``        the post-quantum KEM (ML-KEM, or one from liboqs): keygen, encaps, decaps (both ends)
``x25519``     X25519 key generation and exchanges (both ends)
``combiner``   encoding MA/MB, the CatKDF combine, the key schedule (TLS PSK, identity, MACs)
``auth``       authentication: PSK MACs, or certificate chains and signatures
``kme``        answering QKD requests: key pool, KME requests over HTTPS, key manager
``tls``        the TLS 1.3 external-PSK handshake that carries the session
``other``      the rest: framing, parsing, transcript hashing, state machine, the driver
=============  ===============================================================================

The driver marks ``kme`` and ``tls`` itself; the cryptographic stages are measured by wrapping the
real functions the handshake calls (``hybridkex.hazmat.kem``, the combiner names the protocol
imported, the authenticators) for the duration of a ``with clock.instrument():`` block only, so
the measured path is the real one and nothing is changed outside the breakdown runs.  A wrapped
name that no longer exists is skipped and listed in :attr:`StageClock.missing` (its time then lands
in ``other``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["STAGES", "NullStages", "StageClock"]

#: Stage names in display order.
STAGES: tuple[str, ...] = ("kem", "x25519", "combiner", "auth", "kme", "tls", "other")

# (module, attribute path, stage): the functions wrapped while instrumenting.
_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("hybridkex.hazmat.kem", "MLKEM.generate", "kem"),
    ("hybridkex.hazmat.kem", "MLKEM.from_seed", "kem"),
    ("hybridkex.hazmat.kem", "MLKEM.encapsulate", "kem"),
    ("hybridkex.hazmat.kem", "_MLKEMPrivateKey.decapsulate", "kem"),
    ("hybridkex.hazmat.kem", "OQSKEM.generate", "kem"),
    ("hybridkex.hazmat.kem", "OQSKEM.from_seed", "kem"),
    ("hybridkex.hazmat.kem", "OQSKEM.encapsulate", "kem"),
    ("hybridkex.hazmat.kem", "_OQSPrivateKey.decapsulate", "kem"),
    ("hybridkex.hazmat.kem", "X25519KEM.generate", "x25519"),
    ("hybridkex.hazmat.kem", "X25519KEM.from_private_bytes", "x25519"),
    ("hybridkex.hazmat.kem", "X25519KEM.encapsulate", "x25519"),
    ("hybridkex.hazmat.kem", "_X25519PrivateKey.decapsulate", "x25519"),
    ("hybridkex.protocol._initiator", "combine", "combiner"),
    ("hybridkex.protocol._initiator", "encode_party", "combiner"),
    ("hybridkex.protocol._responder", "combine", "combiner"),
    ("hybridkex.protocol._responder", "encode_party", "combiner"),
    ("hybridkex.tls._bio", "MemoryTLS.__init__", "tls"),
    ("hybridkex.tls._bio", "MemoryTLS.do_handshake", "tls"),
    ("hybridkex.combiner", "CombinedSecret.derive", "combiner"),
    ("hybridkex.combiner", "CombinedSecret.tls_psk", "combiner"),
    ("hybridkex.combiner", "CombinedSecret.tls_identity", "combiner"),
    ("hybridkex.protocol.auth", "MACAuthenticator.prove", "auth"),
    ("hybridkex.protocol.auth", "MACAuthenticator.verify", "auth"),
    ("hybridkex.protocol.auth", "MACAuthenticator.check_peer", "auth"),
    ("hybridkex.protocol.auth", "PKIAuthenticator.prove", "auth"),
    ("hybridkex.protocol.auth", "PKIAuthenticator.verify", "auth"),
    ("hybridkex.protocol.auth", "PKIAuthenticator.check_peer", "auth"),
    ("hybridkex.protocol.auth", "PKIAuthenticator.certificate", "auth"),
)


class NullStages:
    """The do-nothing stage marker used on measured paths (costs two attribute lookups)."""

    def push(self, stage: str) -> None:
        return None

    def pop(self) -> None:
        return None


class StageClock(NullStages):
    """Exclusive time per stage: time goes to the innermost stage that is active.

    Call :meth:`begin` before a handshake and :meth:`end` after it; everything not inside a
    marked stage is ``other``.  :attr:`totals` accumulates seconds over all handshakes measured.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.handshakes = 0
        self.missing: list[str] = []
        self._stack: list[str] = []
        self._t = 0.0

    def begin(self) -> None:
        self._stack = ["other"]
        self._t = time.perf_counter()

    def end(self) -> None:
        now = time.perf_counter()
        if self._stack:
            self.totals[self._stack[-1]] += now - self._t
        self._stack = []
        self.handshakes += 1

    def push(self, stage: str) -> None:
        now = time.perf_counter()
        if self._stack:
            self.totals[self._stack[-1]] += now - self._t
        self._stack.append(stage)
        self._t = now

    def pop(self) -> None:
        now = time.perf_counter()
        self.totals[self._stack.pop()] += now - self._t
        self._t = now

    def per_handshake_ms(self) -> dict[str, float]:
        """Mean milliseconds per handshake for each stage."""
        n = max(self.handshakes, 1)
        return {stage: self.totals[stage] / n * 1e3 for stage in STAGES}

    def _wrap(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        clock = self

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not clock._stack:  # outside a measured handshake (e.g. set-up): do not attribute
                return fn(*args, **kwargs)
            clock.push(stage)
            try:
                return fn(*args, **kwargs)
            finally:
                clock.pop()

        return timed

    @contextlib.contextmanager
    def instrument(self) -> Iterator[StageClock]:
        """Wrap the stage functions for the duration of the block, then restore them."""
        restore: list[tuple[object, str, object]] = []
        try:
            for module_name, path, stage in _TARGETS:
                try:
                    owner: Any = importlib.import_module(module_name)
                    *parents, attr = path.split(".")
                    for name in parents:
                        owner = getattr(owner, name)
                    original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
                except (ImportError, AttributeError, KeyError):
                    self.missing.append(f"{module_name}.{path}")
                    continue
                restore.append((owner, attr, original))
                setattr(owner, attr, self._wrap(original, stage))
            yield self
        finally:
            for owner, attr, original in reversed(restore):
                setattr(owner, attr, original)
