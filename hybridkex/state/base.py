"""The shared-state interface and what its backends share: the counter window, sealing, URLs.

A :class:`SharedState` is what several server processes (one host: SQLite) or hosts (PostgreSQL)
must agree on so that "use at most once" holds across all of them.  Every method is one
transaction; a backend raises :class:`~hybridkex.exceptions.StateError` subclasses only.
"""

from __future__ import annotations

import os
import secrets
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..exceptions import ConfigurationError, StateError

if TYPE_CHECKING:
    from ..recycle.store import AuthKeyStore

__all__ = ["SCHEMA_VERSION", "WINDOW", "Sealer", "SharedState", "StateBase", "Ticket", "advance_window",
           "load_seal_key", "redact_url"]

#: The schema version this hybridkex writes and reads (both backends).
SCHEMA_VERSION: Final = 2
#: Counters accepted out of order behind the highest one (as hybridkex.steady.registry.WINDOW).
WINDOW: Final = 4096
#: Longest scope, kind or ID a backend stores (bounded rows; identities and UUIDs are far shorter).
MAX_NAME: Final = 512
_SEAL_VERSION: Final = b"\x01"


@dataclass(frozen=True, slots=True)
class Ticket:
    """A stored ticket (a steady-state parent, a reconnect ticket). ``secret`` never in ``repr``."""

    kind: str
    handle: bytes
    secret: bytes = field(repr=False)
    meta: bytes
    expires_at: float

    def __repr__(self) -> str:
        return (f"Ticket(kind={self.kind!r}, handle={self.handle.hex()}, expires_at={self.expires_at}, "
                "secret=<redacted>)")


@runtime_checkable
class SharedState(Protocol):
    """What must be shared by every process and host that serves one set of peers.

    * :meth:`spend` — QKD key IDs (and any other single-use IDs): each is accepted at most once,
      across every process using this state, however many race for it.
    * :meth:`spend_counter` — a steady-state parent's counters: a sliding window (IPsec's
      anti-replay), shared.
    * :meth:`hold` / :meth:`take` — IDs announced or pooled ahead of use (announced QKD keys): each
      held ID is taken by exactly one caller, and a taken ID is spent.
    * tickets — a parent's or reconnect ticket's secret, sealed under this host's state key.
    * :meth:`auth_keys` — the recycled-authentication keys (an :class:`~hybridkex.recycle.AuthKeyStore`).
    """

    #: ``"sqlite"`` or ``"postgresql"``.
    backend: str

    @property
    def can_seal(self) -> bool:
        """Whether a state key is configured (tickets are stored only sealed under it)."""
        ...

    def spend(self, scope: str, ids: Sequence[str]) -> bool:
        """Mark every ID of ``ids`` used in ``scope``, all or none: True when none was used before
        (now all are), False when one was (nothing changes)."""
        ...

    def is_spent(self, scope: str, key_id: str) -> bool: ...

    def spend_counter(self, scope: str, index: int, *, window: int = WINDOW) -> str | None:
        """Accept counter ``index`` of ``scope`` once: None, or why not (``"replayed"``, ``"too old"``)."""
        ...

    def spend_claim(self, counter_scope: str, index: int, scope: str, ids: Sequence[str], *,
                    window: int = WINDOW) -> str | None:
        """:meth:`spend_counter`, then (if accepted) :meth:`spend` of ``ids``, in one transaction (one
        round trip: a steady-state connection's whole cost here): None, or why not (``"replayed"``,
        ``"too old"``, ``"key used"``).  An accepted counter stays spent whatever follows."""
        ...

    def hold(self, scope: str, ids: Sequence[str], *, expires_at: float) -> int:
        """Hold IDs for a later :meth:`take` (IDs spent already are not held); how many are now held."""
        ...

    def take(self, scope: str, key_id: str | None = None) -> str | None:
        """Take a held, unexpired ID (``key_id``, or any: the oldest no other caller is taking) and
        spend it, or None.  Each held ID is returned to exactly one caller."""
        ...

    def held(self, scope: str) -> int:
        """Unexpired IDs held in ``scope``."""
        ...

    def put_ticket(self, kind: str, handle: bytes, secret: bytes, *, meta: bytes = b"", expires_at: float) -> None:
        """Store (or replace) a ticket; its secret is sealed under the state key."""
        ...

    def get_ticket(self, kind: str, handle: bytes) -> Ticket | None:
        """The unexpired ticket, its secret unsealed, or None."""
        ...

    def take_ticket(self, kind: str, handle: bytes) -> Ticket | None:
        """:meth:`get_ticket` and :meth:`drop_ticket` in one statement: exactly one caller gets it."""
        ...

    def swap_tickets(self, kind: str, put: Sequence[tuple[bytes, bytes]], drop: Sequence[bytes] = (), *,
                     expires_at: float) -> None:
        """Store tickets ``put`` and forget tickets ``drop`` of one kind, in one transaction."""
        ...

    def drop_ticket(self, kind: str, handle: bytes) -> bool:
        """Forget a ticket; whether there was one."""
        ...

    def purge(self, *, spent_before: float | None = None) -> int:
        """Delete expired tickets and held IDs (and spent IDs recorded before ``spent_before``); rows deleted."""
        ...

    def auth_keys(self) -> AuthKeyStore:
        """The recycled-authentication key store kept in this state."""
        ...

    def close(self) -> None: ...


class StateBase:
    """What both backends share: argument checks, sealing, the shape of each operation.

    A backend implements the ``_``-prefixed row operations (its SQL and its transactions) on
    arguments already checked and secrets already sealed; everything a caller sees (validation,
    de-duplication, sealing bound to the row, unsealing) is here, once.
    """

    backend: str
    _sealer: Sealer | None

    # -- row operations of a backend ---------------------------------------------------------------

    def _spend_ids(self, scope: str, ids: list[str], t: float) -> bool:
        raise NotImplementedError

    def _is_spent(self, scope: str, key_id: str) -> bool:
        raise NotImplementedError

    def _spend_counter(self, scope: str, index: int, window: int) -> str | None:
        raise NotImplementedError

    def _spend_claim(self, counter_scope: str, index: int, window: int, scope: str, ids: list[str], *,
                     t: float) -> str | None:
        raise NotImplementedError

    def _hold(self, scope: str, ids: list[str], t: float, expires_at: float) -> int:
        raise NotImplementedError

    def _take(self, scope: str, key_id: str | None, t: float) -> str | None:
        raise NotImplementedError

    def _held(self, scope: str, t: float) -> int:
        raise NotImplementedError

    def _put_ticket(self, kind: str, handle: bytes, blob: bytes, meta: bytes, expires_at: float) -> None:
        raise NotImplementedError

    def _get_ticket(self, kind: str, handle: bytes, t: float, *, take: bool) -> tuple[bytes, bytes, float] | None:
        """(sealed secret, meta, expires_at) of the unexpired ticket; ``take``: deleted in the same
        statement (at most one caller ever gets it)."""
        raise NotImplementedError

    def _drop_ticket(self, kind: str, handle: bytes) -> bool:
        raise NotImplementedError

    def _swap_tickets(self, kind: str, put: list[tuple[bytes, bytes]], drop: list[bytes], expires_at: float) -> None:
        """Insert (or replace) ``put`` (handle, sealed secret) and delete ``drop``, in one transaction."""
        raise NotImplementedError

    def _purge(self, t: float, spent_before: float | None) -> int:
        raise NotImplementedError

    # -- the interface ---------------------------------------------------------------------------

    def spend(self, scope: str, ids: Sequence[str]) -> bool:
        check_name("scope", scope)
        wanted = key_ids(ids)
        return True if not wanted else self._spend_ids(scope, wanted, now())

    def is_spent(self, scope: str, key_id: str) -> bool:
        return self._is_spent(check_name("scope", scope), check_name("key_id", key_id))

    def spend_counter(self, scope: str, index: int, *, window: int = WINDOW) -> str | None:
        check_name("scope", scope)
        check_window(index, window)
        return self._spend_counter(scope, index, window)

    def spend_claim(self, counter_scope: str, index: int, scope: str, ids: Sequence[str], *,
                    window: int = WINDOW) -> str | None:
        check_name("scope", counter_scope)
        check_name("scope", scope)
        check_window(index, window)
        return self._spend_claim(counter_scope, index, window, scope, key_ids(ids), t=now())

    def hold(self, scope: str, ids: Sequence[str], *, expires_at: float) -> int:
        check_name("scope", scope)
        return self._hold(scope, key_ids(ids), now(), float(expires_at))

    def take(self, scope: str, key_id: str | None = None) -> str | None:
        check_name("scope", scope)
        return self._take(scope, None if key_id is None else check_name("key_id", key_id), now())

    def held(self, scope: str) -> int:
        return self._held(check_name("scope", scope), now())

    @property
    def can_seal(self) -> bool:
        """Whether this state has a state key (it stores tickets only sealed)."""
        return self._sealer is not None

    def sealer(self) -> Sealer:
        """The state key's sealer (tickets and recycled keys are stored only sealed)."""
        if self._sealer is None:
            raise StateError(f"{self!r} has no state key; tickets hold secrets and are stored only sealed "
                             "(pass seal_key, or key_file in [state])")
        return self._sealer

    def put_ticket(self, kind: str, handle: bytes, secret: bytes, *, meta: bytes = b"", expires_at: float) -> None:
        check_name("kind", kind)
        blob = self.sealer().seal(aad("ticket", kind, handle, meta), secret)
        self._put_ticket(kind, bytes(handle), blob, bytes(meta), float(expires_at))

    def get_ticket(self, kind: str, handle: bytes) -> Ticket | None:
        return self._ticket(kind, handle, take=False)

    def take_ticket(self, kind: str, handle: bytes) -> Ticket | None:
        """The unexpired ticket, deleted as it is read: of callers racing for it, exactly one gets it."""
        return self._ticket(kind, handle, take=True)

    def _ticket(self, kind: str, handle: bytes, *, take: bool) -> Ticket | None:
        sealer = self.sealer()
        row = self._get_ticket(check_name("kind", kind), bytes(handle), now(), take=take)
        if row is None:
            return None
        blob, meta, expires_at = row
        meta = bytes(meta)
        return Ticket(kind, bytes(handle), sealer.open(aad("ticket", kind, handle, meta), blob), meta,
                      float(expires_at))

    def drop_ticket(self, kind: str, handle: bytes) -> bool:
        return self._drop_ticket(check_name("kind", kind), bytes(handle))

    def swap_tickets(self, kind: str, put: Sequence[tuple[bytes, bytes]], drop: Sequence[bytes] = (), *,
                     expires_at: float) -> None:
        """Store the tickets ``put`` ((handle, secret), no meta) and forget ``drop``: one transaction,
        one commit (a server's announced keys in, the ones it used out)."""
        check_name("kind", kind)
        sealer = self.sealer()
        sealed = [(bytes(h), sealer.seal(aad("ticket", kind, h, b""), secret)) for h, secret in put]
        self._swap_tickets(kind, sealed, [bytes(h) for h in drop], float(expires_at))

    def purge(self, *, spent_before: float | None = None) -> int:
        return int(self._purge(now(), spent_before))


def key_ids(ids: Sequence[str]) -> list[str]:
    """The IDs checked, duplicates dropped, in order."""
    return list(dict.fromkeys(check_name("key_id", k) for k in ids))


def advance_window(top: int, window: int, index: int, width: int) -> tuple[int, int, str | None]:
    """IPsec's anti-replay window: the new (top, bitmap) after accepting ``index``, or why not."""
    if index > top:
        shift = index - top
        window = ((window << shift) | 1) & ((1 << width) - 1) if shift < width else 1
        return index, window, None
    offset = top - index
    if offset >= width:
        return top, window, "too old"
    if window >> offset & 1:
        return top, window, "replayed"
    return top, window | 1 << offset, None


def check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise ConfigurationError(f"must be a non-empty string of at most {MAX_NAME} characters", field=what)
    return value


def check_window(index: int, window: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigurationError("must be a non-negative integer", field="index")
    if not 1 <= window <= 65536:
        raise ConfigurationError("must be 1..65536", field="window")


def aad(*parts: str | bytes) -> bytes:
    """Length-prefixed parts: a sealed value is bound to the row it belongs to, unambiguously."""
    out = bytearray()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        out += len(b).to_bytes(4, "big") + b
    return bytes(out)


class Sealer:
    """AES-256-GCM under the host's state key, bound to each row (its AAD): a database that leaks
    or is edited yields no key and accepts no forged or swapped row.  The key never goes to the
    database; it is never in ``repr``."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigurationError("the state key must be 32 bytes (64 hex digits in its file)", field="key_file")
        self._aead = AESGCM(bytes(key))

    def __repr__(self) -> str:
        return "Sealer(key=<redacted>)"

    def seal(self, context: bytes, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return _SEAL_VERSION + nonce + self._aead.encrypt(nonce, bytes(plaintext), context)

    def open(self, context: bytes, blob: bytes) -> bytes:
        blob = bytes(blob)
        if blob[:1] != _SEAL_VERSION or len(blob) < 29:
            raise StateError("a sealed state record is malformed (not written by hybridkex, or edited)")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], context)
        except InvalidTag:
            raise StateError("a sealed state record does not verify under this host's state key (another "
                             "key_file than the one that wrote it, or an edited row)") from None


def load_seal_key(path: str | os.PathLike[str]) -> bytes:
    """The state key from its file: 64 hex digits (``openssl rand -hex 32 > FILE``), or 32 raw bytes."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigurationError(f"cannot read the state key {p}: {exc.strerror}", field="key_file") from None
    if mode & 0o077:
        raise ConfigurationError(f"{p} is readable by others (mode {mode & 0o777:o}); chmod 600 it",
                                 field="key_file")
    text = raw.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(raw) == 32:
        return raw
    raise ConfigurationError(f"{p} must hold 64 hex digits or 32 bytes", field="key_file")


def redact_url(url: str) -> str:
    """``url`` without its password (for messages, logs and ``repr``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if not any(k == "password" for k, _ in query):
            return url
        parts = parts._replace(query=urllib.parse.urlencode(
            [(k, "***" if k == "password" else v) for k, v in query], safe="/"))
        return urllib.parse.urlunsplit(parts)
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def now() -> float:
    """Wall-clock time: shared by hosts, unlike a monotonic clock (expiries are stored)."""
    return time.time()
