"""The simulated KME pair's state: a QKD link model and the key store, with no HTTP in sight.

:class:`QKDLinkModel` stands in for the QKD hardware: it produces key material at a fixed rate
(bits per second) into a bounded reservoir.  :class:`KeyStore` holds what both KMEs of the pair
know: which SAE each KME serves, and every key handed to a master SAE but not yet fetched by all
of its slaves.  Since both simulated KMEs run in one process, the store also plays the KME-to-KME
channel: a key taken through ``enc_keys`` at one KME becomes retrievable, exactly once per named
slave, through ``dec_keys`` at the KME serving that slave.

Every public method takes the store's lock, so the HTTP layer (or a test) can call it from any
thread.  Refusals raise :class:`~hybridkex.qkd.etsi014.RequestRejected` with the HTTP status and
the message ETSI GS QKD 014 prescribes.  With ``db_path`` the pending keys live in SQLite as well
(committed before the answer leaves), so a restarted KME neither loses an undelivered key nor
delivers one twice.  Logs carry SAE IDs and key IDs, never key material.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ...exceptions import ConfigurationError
from ..base import QKDKey
from ..etsi014 import (
    INT32_MAX,
    MSG_EXTENSION_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SERVER_ERROR,
    MSG_SIZE_NOT_MULTIPLE_OF_8,
    MSG_UNAUTHORIZED,
    KeyRequest,
    RequestRejected,
)

__all__ = ["KMELimits", "KeyStore", "KeySupply", "QKDLinkModel", "StoreStats"]

log = logging.getLogger("hybridkex.qkd.kme")


class QKDLinkModel:
    """Key material produced at ``rate_bps`` into a reservoir of ``capacity_bits`` (not thread-safe).

    The level is computed lazily from the clock, so there is no background thread.  The reservoir
    starts full unless ``initial_bits`` says otherwise.
    """

    def __init__(
        self,
        rate_bps: float,
        capacity_bits: int,
        *,
        initial_bits: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_bps >= 0 or math.isinf(rate_bps):
            raise ConfigurationError("must be a finite number >= 0", field="rate_bps")
        if capacity_bits <= 0:
            raise ConfigurationError("must be > 0", field="capacity_bits")
        self.rate_bps = float(rate_bps)
        self.capacity_bits = int(capacity_bits)
        self._clock = clock
        self._bits = float(capacity_bits if initial_bits is None else min(max(initial_bits, 0), capacity_bits))
        self._at = clock()

    def available_bits(self) -> int:
        """Key material ready now, in bits."""
        now = self._clock()
        self._bits = min(float(self.capacity_bits), self._bits + (now - self._at) * self.rate_bps)
        self._at = now
        return int(self._bits)

    def take(self, bits: int) -> bool:
        """Consume ``bits`` if that much is ready; False (and nothing consumed) otherwise."""
        if self.available_bits() < bits:
            return False
        self._bits -= bits
        return True

    def draw(self, bits: int, randbytes: Callable[[int], bytes]) -> bytes | None:
        """``bits`` of key material (from ``randbytes``: this model has no real link), or ``None`` if not ready."""
        return randbytes(bits // 8) if self.take(bits) else None

    def status_extension(self, kme_id: str) -> dict[str, Any] | None:
        """Nothing to add to Status: the rate is configured, not measured."""
        del kme_id
        return None

    def seconds_until(self, bits: int) -> float | None:
        """How long until ``bits`` are ready (``None`` if never: more than the capacity, or rate 0)."""
        missing = bits - self.available_bits()
        if missing <= 0:
            return 0.0
        if bits > self.capacity_bits or self.rate_bps == 0:
            return None
        return missing / self.rate_bps


class KeySupply(Protocol):
    """Where the store's key material comes from: :class:`QKDLinkModel`, or a simulated BB84 link
    (:class:`~.linksupply.LinkKeySupply`)."""

    capacity_bits: int

    def available_bits(self) -> int: ...
    def seconds_until(self, bits: int) -> float | None: ...
    def draw(self, bits: int, randbytes: Callable[[int], bytes]) -> bytes | None: ...
    def status_extension(self, kme_id: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class KMELimits:
    """What the simulated KMEs accept; reported in Status (Table 9)."""

    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = 128
    max_sae_id_count: int = 4
    #: Keys delivered to masters and not yet fetched by every slave; beyond this, enc_keys gets 503.
    max_pending_keys: int = 100_000

    def __post_init__(self) -> None:
        for name in ("key_size", "min_key_size", "max_key_size"):
            if getattr(self, name) <= 0 or getattr(self, name) % 8:
                raise ConfigurationError("must be a positive multiple of 8", field=name)
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ConfigurationError("need min_key_size <= key_size <= max_key_size", field="key_size")
        if self.max_key_per_request < 1 or self.max_sae_id_count < 0 or self.max_pending_keys < 1:
            raise ConfigurationError("limits must be positive", field="max_key_per_request")


@dataclass
class _Pending:
    master: str
    slaves: frozenset[str]
    key: bytes = field(repr=False)
    retrieved: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters for tests, benchmarks and the operator (no key material)."""

    pending_keys: int
    available_bits: int
    keys_issued: int
    keys_delivered: int
    status_requests: int
    enc_keys_requests: int
    dec_keys_requests: int
    rejected_requests: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_keys (
    key_id    TEXT PRIMARY KEY,
    master    TEXT NOT NULL,
    slaves    TEXT NOT NULL,
    retrieved TEXT NOT NULL,
    key       BLOB NOT NULL,
    created   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SCHEMA_VERSION = "1"


class KeyStore:
    """The state both simulated KMEs share (see the module docstring). Thread-safe.

    Args:
        homes: which KME serves each SAE, ``{sae_id: kme_id}``.
        link: the QKD link model both KMEs draw from.
        limits: request limits.
        db_path: SQLite file that keeps pending keys across restarts (``None``: memory only).
        randbytes: the "QKD" randomness (``os.urandom``; replace only in tests).
    """

    def __init__(
        self,
        homes: Mapping[str, str],
        link: KeySupply,
        *,
        limits: KMELimits | None = None,
        db_path: str | Path | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not homes:
            raise ConfigurationError("at least one SAE must be served", field="homes")
        self._homes = dict(homes)
        self.kme_ids = tuple(sorted(set(self._homes.values())))
        self._link = link
        self.limits = limits or KMELimits()
        self._randbytes = randbytes
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._counters = dict.fromkeys(("issued", "delivered", "status", "enc", "dec", "rejected"), 0)
        self._db: sqlite3.Connection | None = None
        if db_path is not None:
            self._open_db(Path(db_path))

    # -- persistence ------------------------------------------------------------------------------

    def _open_db(self, path: Path) -> None:
        try:
            if not path.exists():
                # Create it private first: the file holds undelivered key material.
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise ConfigurationError(f"{path} has schema {row[0]}, expected {_SCHEMA_VERSION}", field="db")
            rows = db.execute("SELECT key_id, master, slaves, retrieved, key FROM pending_keys").fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise ConfigurationError(f"cannot open key database {path}: {exc}", field="db") from None
        for key_id, master, slaves, retrieved, key in rows:
            self._pending[key_id] = _Pending(master, frozenset(json.loads(slaves)), bytes(key),
                                             set(json.loads(retrieved)))
        self._db = db
        log.info("key database %s: %d undelivered key(s) restored", path, len(rows))

    def _persist(self, statements: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                self._db.execute(sql, params)
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            log.exception("key database write failed")
            raise RequestRejected(MSG_SERVER_ERROR, status=503, details=[{"reason": "key database error"}]) from None

    def close(self) -> None:
        """Close the database (pending keys stay in it for the next start)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- queries ----------------------------------------------------------------------------------

    def home(self, sae_id: str) -> str | None:
        """The KME that serves ``sae_id``, or ``None`` if it is unknown to the pair."""
        return self._homes.get(sae_id)

    @property
    def capacity_bits(self) -> int:
        """The most key material the link keeps ready, in bits (ETSI status ``max_key_count`` x key_size)."""
        return self._link.capacity_bits

    def serves(self, kme_id: str, sae_id: str | None) -> bool:
        """True if ``kme_id`` serves the SAE ``sae_id``."""
        return sae_id is not None and self._homes.get(sae_id) == kme_id

    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        with self._lock:
            c = self._counters
            return StoreStats(len(self._pending), self._link.available_bits(), c["issued"], c["delivered"],
                              c["status"], c["enc"], c["dec"], c["rejected"])

    def _authorize(self, kme_id: str, caller: str | None) -> str:
        if caller is None or not self.serves(kme_id, caller):
            self._counters["rejected"] += 1
            raise RequestRejected(MSG_UNAUTHORIZED, status=401)
        return caller

    def _peer(self, sae_id: str, role: str) -> str:
        home = self._homes.get(sae_id)
        if home is None:
            self._counters["rejected"] += 1
            raise RequestRejected(f"{role} SAE ID {sae_id!r} is not known to this KME network")
        return home

    def _not_self(self, master: str, slaves: Sequence[str], field: str) -> None:
        # A master named as its own slave could fetch its own key again through dec_keys: that key
        # would then have been delivered twice, to the same SAE.  ETSI 014 speaks of a pair of SAEs.
        if master in slaves:
            raise self._reject(f"{field} {master!r} is the calling master SAE; a master cannot be a slave "
                               "of its own keys", details=[{field: master}])

    def _reject(self, message: str, **kwargs: Any) -> RequestRejected:
        self._counters["rejected"] += 1
        return RequestRejected(message, **kwargs)

    # -- the three methods ------------------------------------------------------------------------

    def status(self, kme_id: str, caller: str | None, slave_sae_id: str) -> dict[str, Any]:
        """Get status: the Status object (Table 9) for ``caller`` as master and ``slave_sae_id``."""
        with self._lock:
            master = self._authorize(kme_id, caller)
            target = self._peer(slave_sae_id, "slave")
            self._not_self(master, (slave_sae_id,), "slave_SAE_ID")
            self._counters["status"] += 1
            lim = self.limits
            return {
                "source_KME_ID": kme_id,
                "target_KME_ID": target,
                "master_SAE_ID": master,
                "slave_SAE_ID": slave_sae_id,
                "key_size": lim.key_size,
                # JSON integers stay within int32 (what every client can represent), even for huge links.
                "stored_key_count": min(INT32_MAX, self._link.available_bits() // lim.key_size),
                "max_key_count": min(INT32_MAX, self._link.capacity_bits // lim.key_size),
                "max_key_per_request": lim.max_key_per_request,
                "max_key_size": lim.max_key_size,
                "min_key_size": lim.min_key_size,
                "max_SAE_ID_count": lim.max_sae_id_count,
            } | ({"status_extension": ext} if (ext := self._link.status_extension(kme_id)) else {})

    def enc_keys(self, kme_id: str, caller: str | None, slave_sae_id: str, request: KeyRequest) -> list[QKDKey]:
        """Get key: new keys for ``caller`` (master), retrievable once by each named slave."""
        with self._lock:
            master = self._authorize(kme_id, caller)
            self._peer(slave_sae_id, "slave")
            self._not_self(master, (slave_sae_id,), "slave_SAE_ID")
            lim = self.limits
            if request.extension_mandatory:
                # This KME implements no extension, so any mandatory one is unsupported (cl. 6.2).
                raise self._reject(MSG_EXTENSION_MANDATORY_UNSUPPORTED)
            number = 1 if request.number is None else request.number
            size = lim.key_size if request.size is None else request.size
            if not 1 <= number <= lim.max_key_per_request:
                raise self._reject(f"number must be between 1 and max_key_per_request ({lim.max_key_per_request})")
            if size % 8:
                raise self._reject(MSG_SIZE_NOT_MULTIPLE_OF_8)
            if not lim.min_key_size <= size <= lim.max_key_size:
                raise self._reject(f"size must be between min_key_size ({lim.min_key_size}) "
                                   f"and max_key_size ({lim.max_key_size})")
            extra = request.additional_slave_sae_ids
            if len(extra) > lim.max_sae_id_count:
                raise self._reject(f"at most max_SAE_ID_count ({lim.max_sae_id_count}) additional slave SAE IDs")
            slaves = (slave_sae_id, *extra)
            if len(set(slaves)) != len(slaves):
                raise self._reject("a slave SAE ID is named twice")
            for s in extra:
                self._peer(s, "additional slave")
            self._not_self(master, extra, "additional_slave_SAE_IDs")
            if len(self._pending) + number > lim.max_pending_keys:
                raise self._reject(MSG_SERVER_ERROR, status=503,
                                   details=[{"reason": "too many keys awaiting their slave SAE"}])
            bits = number * size
            material = self._link.draw(bits, self._randbytes)
            if material is None:
                wait = self._link.seconds_until(bits)
                reason = ("not enough key material on the QKD link yet" if wait is not None
                          else "request exceeds what the QKD link can ever store")
                raise self._reject(MSG_SERVER_ERROR, status=503, retry_after=wait,
                                   details=[{"reason": reason}, {"available_bits": self._link.available_bits()}])
            step = size // 8
            keys = [QKDKey(str(uuid.uuid4()), material[i * step:(i + 1) * step]) for i in range(number)]
            now = time.time()
            frozen = frozenset(slaves)
            rows = [(k.key_id, master, json.dumps(sorted(frozen)), "[]", k.key, now) for k in keys]
            self._persist([("INSERT INTO pending_keys VALUES (?, ?, ?, ?, ?, ?)", r) for r in rows])
            for k in keys:
                self._pending[k.key_id] = _Pending(master, frozen, k.key)
            self._counters["issued"] += number
            self._counters["enc"] += 1
        log.info("enc_keys at %s: master=%s slaves=%s key_IDs=%s", kme_id, master, ",".join(slaves),
                 ",".join(k.key_id for k in keys))
        return keys

    def dec_keys(self, kme_id: str, caller: str | None, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """Get key with key IDs: the keys, each delivered at most once to each slave, then deleted."""
        with self._lock:
            slave = self._authorize(kme_id, caller)
            if len(key_ids) > self.limits.max_key_per_request:
                raise self._reject(f"at most max_key_per_request ({self.limits.max_key_per_request}) key IDs")
            unauthorized = not_found = False
            for key_id in key_ids:
                entry = self._pending.get(key_id)
                if entry is None:
                    not_found = True
                elif slave not in entry.slaves:
                    unauthorized = True  # cl. 5.4: the caller was not named as a slave for this key
                elif entry.master != master_sae_id or slave in entry.retrieved:
                    not_found = True  # a replay, or a key of another master: not found for this request
            if unauthorized:
                self._counters["rejected"] += 1
                log.warning("dec_keys at %s: SAE %s asked for key(s) not shared with it: %s", kme_id, slave,
                            ",".join(key_ids))
                raise RequestRejected(MSG_UNAUTHORIZED, status=401)
            if not_found:
                raise self._reject(MSG_KEYS_NOT_FOUND)
            statements: list[tuple[str, tuple[Any, ...]]] = []
            done: list[str] = []
            for key_id in key_ids:
                entry = self._pending[key_id]
                retrieved = entry.retrieved | {slave}
                if retrieved >= entry.slaves:
                    statements.append(("DELETE FROM pending_keys WHERE key_id = ?", (key_id,)))
                    done.append(key_id)
                else:
                    statements.append(("UPDATE pending_keys SET retrieved = ? WHERE key_id = ?",
                                       (json.dumps(sorted(retrieved)), key_id)))
            self._persist(statements)  # durable before the keys leave: no second delivery after a crash
            out = []
            for key_id in key_ids:
                entry = self._pending[key_id]
                entry.retrieved.add(slave)
                out.append(QKDKey(key_id, entry.key))
            for key_id in done:
                del self._pending[key_id]
            self._counters["delivered"] += len(out)
            self._counters["dec"] += 1
        log.info("dec_keys at %s: slave=%s master=%s key_IDs=%s", kme_id, slave, master_sae_id, ",".join(key_ids))
        return out

