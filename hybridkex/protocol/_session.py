"""The result of a handshake: the keys (opaque) and what was established (public facts only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, NoReturn

from ..combiner import CombinedSecret
from ..hazmat import labels

__all__ = ["Component", "Session", "SessionInfo"]


@dataclass(frozen=True, slots=True)
class Component:
    """One secret that went into the combined key."""

    #: ``"X25519"``, ``"ML-KEM-768"``, ``"QKD"``, ...
    name: str
    #: ``"classical"``, ``"post-quantum"`` or ``"qkd"``.
    kind: Literal["classical", "post-quantum", "qkd"]
    #: Length of the component's shared secret in bytes.
    secret_bytes: int


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Everything a log, an audit or a policy check needs about a session, and no secret.

    ``repr`` and :meth:`as_dict` contain only public values: the transcript hash is a hash of
    public messages.  A session without QKD always says why in :attr:`qkd_note`.
    """

    #: Handshake protocol version.
    version: int
    #: Our role: ``"initiator"`` or ``"responder"``.
    role: Literal["initiator", "responder"]
    #: Name of the suite that ran.
    suite: str
    #: Suites the initiator offered, in its order (all authenticated).
    offered_suites: tuple[str, ...]
    local_identity: str
    #: The peer's authenticated identity.
    peer_identity: str
    #: ``"psk"``, ``"pki-ed25519"``, ``"pki-mldsa65"``, ``"pki-hybrid"`` (or ``"recycled"``).
    auth_mode: str
    #: The secrets that contributed to the combined key, in combiner order.
    components: tuple[Component, ...]
    #: Whether a QKD key is part of the combined key.
    qkd_used: bool
    #: ``"fresh"`` (new QKD keys for this handshake), ``"epoch"`` (the peer pair's epoch key, mixed
    #: with this handshake's own X25519 and ML-KEM secrets), or ``"none"``.
    qkd_usage: Literal["fresh", "epoch", "none"]
    #: This side's QKD policy: ``"required"``, ``"optional"`` or ``"disabled"``.
    qkd_policy: str
    qkd_key_ids: tuple[str, ...]
    master_sae_id: str | None
    slave_sae_id: str | None
    master_kme_id: str | None
    slave_kme_id: str | None
    #: Why no QKD key was used (None when one was): plain words, never a silent downgrade.
    qkd_note: str | None
    #: Hash (the suite's) of every handshake message, hex.  Both sides compute the same value.
    transcript_hash: str
    #: Authentication modes the initiator offered, in its order (all authenticated).
    offered_auth_modes: tuple[str, ...] = ()
    #: Recycled mode: the public ID (hex) of the recycled key that authenticated this handshake.
    auth_key_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for logs and the CLI)."""
        d = asdict(self)
        d["components"] = [asdict(c) for c in self.components]
        d["offered_suites"] = list(self.offered_suites)
        d["qkd_key_ids"] = list(self.qkd_key_ids)
        d["offered_auth_modes"] = list(self.offered_auth_modes)
        return d

    def summary(self) -> str:
        """One line for humans."""
        parts = " + ".join(f"{c.name} ({c.secret_bytes * 8} bit)" for c in self.components)
        qkd = f"QKD {self.qkd_usage}" if self.qkd_used else f"no QKD: {self.qkd_note}"
        return (f"{self.suite}: {parts}; {qkd}; peer {self.peer_identity!r} authenticated by "
                f"{self.auth_mode}")


class Session:
    """A completed handshake: the combined secret (opaque) and its :class:`SessionInfo`.

    Take what you need through the labelled methods (each is an independent key); call
    :meth:`erase` when the session's keys are no longer needed.  The secret never appears in
    ``repr``; a session cannot be pickled.
    """

    __slots__ = ("_secret", "info")

    def __init__(self, secret: CombinedSecret, info: SessionInfo) -> None:
        self._secret = secret
        self.info = info

    def __repr__(self) -> str:
        return f"Session({self.info!r}, secret={self._secret!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("Session cannot be pickled")

    @property
    def secret(self) -> CombinedSecret:
        """The combined secret itself (opaque; see :class:`hybridkex.CombinedSecret`)."""
        return self._secret

    def tls_psk(self) -> bytes:
        """The TLS 1.3 external PSK (HashLen bytes of the suite's hash)."""
        return self._secret.tls_psk()

    def tls_identity(self) -> bytes:
        """The TLS 1.3 PSK identity both sides derive (printable ASCII, docs/spec.md 4.3)."""
        return self._secret.tls_identity()

    def next_auth_key(self) -> bytes:
        """The authentication key for the next handshake of this peer pair (recycled mode)."""
        return self._secret.next_auth_key()

    def next_auth_key_id(self) -> bytes:
        """The public 16-byte ID of :meth:`next_auth_key` (both sides derive the same; not secret)."""
        return self._secret.derive(labels.NEXT_AUTH_KEY_ID, 16)

    def exporter(self, label: bytes, length: int, context: bytes = b"") -> bytes:
        """An application key named by ``label`` (like the TLS exporter)."""
        return self._secret.exporter(label, length, context)

    def erase(self) -> None:
        """Overwrite and drop the combined secret; later derivations raise AlreadyFinalized."""
        self._secret.erase()
