"""Events returned by :meth:`Initiator.next_event` / :meth:`Responder.next_event`.

Besides the event classes, ``next_event`` returns one of two sentinels:

* :data:`NEED_DATA`: feed more bytes from the peer with ``receive_data``;
* :data:`PAUSED`: a QKD request event was returned earlier and is not answered yet; answer it
  with ``provide_qkd_keys`` or ``qkd_unavailable``.

Each QKD request is returned exactly once, so a driver never asks the KME twice for one request.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ._session import Session

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "Event",
    "HandshakeComplete",
    "QKDKeysByIdRequired",
    "QKDKeysRequired",
    "Sentinel",
]

Usage = Literal["fresh", "epoch"]


class Sentinel(Enum):
    """The two non-event answers of ``next_event``."""

    #: Feed more bytes from the peer.
    NEED_DATA = "NEED_DATA"
    #: Waiting for the answer to an earlier QKD request.
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.value


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


class Event:
    """Base class of handshake events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class QKDKeysRequired(Event):
    """We are the ETSI GS QKD 014 master: take ``number`` keys of ``size_bits`` for ``slave_sae_id``.

    ``usage`` says which key budget applies (docs/spec.md, "QKD key budget"): ``"fresh"`` means
    keys never used before; ``"epoch"`` allows the driver to answer with the current epoch key of
    this peer (see :class:`hybridkex.io.QKDKeyManager`).  Answer with ``provide_qkd_keys(keys)`` in
    the order the KME returned them, or ``qkd_unavailable(reason)``.
    """

    slave_sae_id: str
    number: int
    size_bits: int
    usage: Usage


@dataclass(frozen=True, slots=True)
class QKDKeysByIdRequired(Event):
    """We are the slave: fetch the keys ``key_ids`` that ``master_sae_id`` took (ETSI "dec_keys").

    With ``usage == "epoch"`` a key ID may have been fetched in an earlier handshake; the driver
    then answers from its epoch cache (a KME delivers each key ID only once).
    """

    master_sae_id: str
    key_ids: tuple[str, ...]
    usage: Usage


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """The handshake succeeded; ``session`` holds the keys and the :class:`SessionInfo`.

    For the initiator, flush ``data_to_send()`` after this event: its Finished is still queued.
    """

    session: Session
