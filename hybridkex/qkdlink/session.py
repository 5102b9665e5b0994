"""What the two ends of a running link share or keep between blocks, without any I/O.

* :class:`LinkSettings`: the physical link, the block size, the eavesdropper, the bootstrap secret.
* :class:`QuantumChannel`: the simulated fibre.  It samples block ``n`` once (seeded) and gives each
  end only its own half; the classical frames go over a real socket, the photons cannot.
* :class:`AuthStream`: one end's authentication key as a stream: the bootstrap secret, then the
  slices reserved from confirmed blocks, in the order the blocks were confirmed.  Block ``n`` uses
  the fixed bytes ``[(n-1)*B, n*B)`` of it (B = 112 bytes: a hash key and 6 one-time pads), so the
  two ends stay in step whatever dies half way (a lost frame, a dropped connection), and a block
  number is never used twice.  How much each confirmed block reserves depends only on what both
  ends know (its number, its length, the stream so far), never on timing.
* :class:`LinkStats`: counters for status, logs and the benchmark (no key material).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..exceptions import BootstrapExhausted, ConfigurationError, HybridKEXError, LinkAbort, LinkAuthenticationError
from . import events, model
from . import postprocess as pp
from .auth import KEY_BYTES, KeyPool
from .mitm import TamperSpec
from .protocol import TAGS_PER_BLOCK

__all__ = ["BLOCK_AUTH_BYTES", "AuthStream", "LinkSettings", "LinkStats", "QuantumChannel", "abort_reason"]

#: Authentication key one block consumes: its hash key and one pad per phase tag.
BLOCK_AUTH_BYTES = KEY_BYTES * (1 + TAGS_PER_BLOCK)


@dataclass(frozen=True)
class LinkSettings:
    """One simulated BB84 link between the KMEs.

    ``speedup`` scales the pulse rate: a block of ``pulses_per_block`` pulses stands for
    ``pulses_per_block / pulse_rate_hz`` seconds of fibre time and is not released sooner than that
    divided by ``speedup``; ``0`` runs blocks as fast as the CPU allows.  Rates are always reported
    at the real pulse rate as well (real-rate equivalent).
    """

    link: model.LinkParameters = field(default_factory=lambda: model.GYS.at(50.0))
    pulses_per_block: int = 10**8
    config: pp.PostProcessConfig | None = None
    eavesdrop_fraction: float = 0.0
    seed: int | None = None
    bootstrap: bytes = field(default_factory=lambda: os.urandom(512), repr=False)
    #: The authentication stream is kept this far (bits) ahead of the last confirmed block.
    auth_target_bits: int = 4096
    speedup: float = 0.0
    #: A man in the middle on the classical channel (demonstrations): see :mod:`.mitm`.
    mitm: TamperSpec | None = None

    def __post_init__(self) -> None:
        if self.pulses_per_block < 1000:
            raise ConfigurationError("must be at least 1000 pulses", field="pulses_per_block")
        if not 0.0 <= self.eavesdrop_fraction <= 1.0:
            raise ConfigurationError("must be between 0 and 1", field="eavesdrop_fraction")
        if not self.speedup >= 0:
            raise ConfigurationError("must be >= 0 (0: as fast as possible)", field="speedup")
        if len(self.bootstrap) < BLOCK_AUTH_BYTES:
            raise BootstrapExhausted(
                f"authentication key exhausted: the bootstrap secret ({8 * len(self.bootstrap)} bits) ran out "
                f"before the first block completed; one block needs {8 * BLOCK_AUTH_BYTES} bits and the first "
                f"two {16 * BLOCK_AUTH_BYTES}: provide a longer bootstrap secret")
        if self.auth_target_bits < 8 * BLOCK_AUTH_BYTES:
            raise ConfigurationError(f"must be at least {8 * BLOCK_AUTH_BYTES} bits (one block)",
                                     field="auth_target_bits")

    @property
    def postprocess(self) -> pp.PostProcessConfig:
        return self.config or pp.PostProcessConfig.calibrated(self.link)

    @property
    def block_seconds(self) -> float:
        """Fibre time of one block at the real pulse rate."""
        return self.pulses_per_block / self.link.pulse_rate_hz


class QuantumChannel:
    """The simulated fibre: block ``n``'s detection events, each half given once to its end. Thread-safe."""

    def __init__(self, settings: LinkSettings) -> None:
        self._settings = settings
        self._entropy = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(16), "big")
        self._lock = threading.Lock()
        self._blocks: dict[int, tuple[events.Block, set[str]]] = {}

    def _block(self, n: int) -> events.Block:
        s = self._settings
        rng = np.random.default_rng([self._entropy, n])
        return events.simulate_block(s.link, s.pulses_per_block, rng, eavesdrop_fraction=s.eavesdrop_fraction)

    def half(self, side: str, n: int) -> tuple[events.Block, np.random.Generator]:
        """Block ``n`` for ``side`` (``"alice"`` or ``"bob"``); the generator is that end's own randomness."""
        with self._lock:
            entry = self._blocks.get(n)
            if entry is None:
                entry = self._blocks[n] = (self._block(n), set())
            block, taken = entry
            if side in taken:
                raise ConfigurationError(f"block {n} was already given to {side}", field="block")
            taken.add(side)
            # Blocks are numbered upwards; a half never fetched (its block died) is dropped later.
            for old in [k for k in self._blocks if k < n - 2 or (k == n and len(taken) == 2)]:
                del self._blocks[old]
        # Alice's choices (QBER sample, hash seeds) are hers: an independent generator per block.
        side_rng = np.random.default_rng([self._entropy, n, 1 if side == "alice" else 2])
        return block, side_rng


class AuthStream:
    """One end's authentication key stream (see the module docstring). Not thread-safe."""

    def __init__(self, bootstrap: bytes, target_bits: int) -> None:
        self._buf = bytearray(bootstrap)
        self._base = 0            # stream offset of _buf[0]
        self._next_block = 1      # lowest block number not yet used
        self.target_bytes = target_bits // 8
        self.bootstrap_bits = 8 * len(bootstrap)
        self.consumed_bits = 0
        self.reserved_bits = 0

    def __repr__(self) -> str:
        return f"AuthStream(consumed={self.consumed_bits} bits, reserved={self.reserved_bits} bits)"

    @property
    def length(self) -> int:
        return self._base + len(self._buf)

    @property
    def available_bits(self) -> int:
        return 8 * max(0, self.length - (self._next_block - 1) * BLOCK_AUTH_BYTES)

    def pool_for(self, n: int) -> KeyPool:
        """Block ``n``'s key, as the pool its two protocol ends draw from; block numbers only go up."""
        if n < self._next_block:
            raise ConfigurationError(f"block number {n} already used (next is {self._next_block}): "
                                     "authentication key is never reused", field="block")
        start, end = (n - 1) * BLOCK_AUTH_BYTES, n * BLOCK_AUTH_BYTES
        if end > self.length:
            if self.reserved_bits == 0:
                raise BootstrapExhausted(
                    f"authentication key exhausted: the bootstrap secret ({self.bootstrap_bits} bits) ran out "
                    f"before the first block completed (block {n} needs bits {8 * start}..{8 * end}); "
                    "provide a longer bootstrap secret")
            raise BootstrapExhausted(
                f"authentication key exhausted at block {n}: aborted blocks used up the reserved key; "
                "re-bootstrap the link with a new pre-shared secret")
        # Skipped numbers (their blocks never started) are burnt with the rest: never reused.
        self.consumed_bits += 8 * (end - max(start, (self._next_block - 1) * BLOCK_AUTH_BYTES))
        key = bytes(self._buf[start - self._base:end - self._base])
        del self._buf[:end - self._base]
        self._base = end
        self._next_block = n + 1
        return KeyPool(key)

    def reserve_for(self, n: int, final_bytes: int) -> int:
        """Bytes block ``n`` (confirmed) gives to the stream: enough to reach ``target`` past it."""
        want = n * BLOCK_AUTH_BYTES + self.target_bytes - self.length
        return max(0, min(final_bytes, want))

    def add(self, key: bytes) -> None:
        self._buf += key
        self.reserved_bits += 8 * len(key)


def abort_reason(err: HybridKEXError | None) -> str:
    """Why a block gave no key, as one of a fixed few words (metrics labels must stay bounded):
    ``qber``, ``verification``, ``authentication`` (a MAC failure), ``no_secret_key``, ``abandoned``
    (the connection or the peer went away) or ``other``."""
    if isinstance(err, LinkAuthenticationError):
        return "authentication"
    if isinstance(err, LinkAbort):
        reason = err.reason.replace(" ", "_")
        return reason if reason in ("qber", "verification", "no_secret_key", "abandoned") else "other"
    return "abandoned" if err is None else "other"


@dataclass
class LinkStats:
    """One end's counters (thread-safe enough: written by its driver only, read for status)."""

    side: str
    started: float = field(default_factory=time.monotonic)
    blocks_started: int = 0
    blocks_ok: int = 0
    blocks_aborted: int = 0
    aborted_qber: int = 0
    aborted_auth: int = 0
    aborted_other: int = 0
    pending_discarded: int = 0
    key_bits_delivered: int = 0
    final_bits: int = 0
    pulses: int = 0           # of the blocks finished (ok or not)
    leaked_ec_bits: int = 0
    last_qber: float | None = None
    last_error: str = ""
    alarms: int = 0
    fatal: str = ""
    auth: AuthStream | None = field(default=None, repr=False)
    #: Aborted blocks by :func:`abort_reason`, and alarms by kind (qber, authentication, replay, stopped).
    aborted_reasons: dict[str, int] = field(default_factory=dict)
    alarm_kinds: dict[str, int] = field(default_factory=dict)
    qber_sum: float = 0.0     # over the blocks whose QBER was measured (completed or aborted on QBER)
    qber_blocks: int = 0

    def alarm(self, kind: str) -> None:
        self.alarms += 1
        self.alarm_kinds[kind] = self.alarm_kinds.get(kind, 0) + 1

    def aborted(self, reason: str) -> None:
        self.blocks_aborted += 1
        self.aborted_reasons[reason] = self.aborted_reasons.get(reason, 0) + 1

    def measured(self, qber: float) -> None:
        self.last_qber = qber
        self.qber_sum += qber
        self.qber_blocks += 1

    def snapshot(self, pulse_rate_hz: float) -> dict[str, Any]:
        """The ``status_extension`` view of this end (JSON types only)."""
        fibre_s = self.pulses / pulse_rate_hz if pulse_rate_hz else 0.0
        wall = max(1e-9, time.monotonic() - self.started)
        out: dict[str, Any] = {
            "link_side": self.side,
            "qber": self.last_qber,
            "qber_mean": self.qber_sum / self.qber_blocks if self.qber_blocks else None,
            "blocks_started": self.blocks_started,
            "blocks_ok": self.blocks_ok,
            "blocks_aborted": self.blocks_aborted,
            "blocks_aborted_qber": self.aborted_qber,
            "blocks_aborted_authentication": self.aborted_auth,
            "pending_keys_discarded": self.pending_discarded,
            "alarms": self.alarms,
            "last_alarm": self.last_error,
            # Real-rate equivalents, per second of fibre time at the real pulse rate: the secret key the
            # finished blocks distilled, and what reached the KMEs after authentication took its share.
            "secret_key_rate_bps": self.final_bits / fibre_s if fibre_s else 0.0,
            "net_key_rate_bps": self.key_bits_delivered / fibre_s if fibre_s else 0.0,
            "delivered_rate_bps_wall": self.key_bits_delivered / wall,
            "key_bits_delivered": self.key_bits_delivered,
            "error_correction_leaked_bits": self.leaked_ec_bits,
            "pulses": self.pulses,
        }
        if self.auth is not None:
            out |= {"auth_bootstrap_bits": self.auth.bootstrap_bits, "auth_consumed_bits": self.auth.consumed_bits,
                    "auth_reserved_bits": self.auth.reserved_bits, "auth_available_bits": self.auth.available_bits}
        if self.fatal:
            out["link_stopped"] = self.fatal
        return out
