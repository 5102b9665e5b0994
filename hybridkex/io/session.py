"""What a hybridkex connection reports about itself: :class:`HybridSession`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..exceptions import LocalProtocolError
from ..protocol import SessionInfo
from ..steady import SteadyFacts
from ..tls import EXPORTER_LABEL, EXPORTER_LENGTH, TLSInfo

__all__ = ["HybridSession"]

#: ``(label, length, context) -> bytes``: the TLS exporter of one live connection.
Exporter = Callable[[bytes, int, "bytes | None"], bytes]


@dataclass(frozen=True, slots=True, eq=False)
class HybridSession:
    """The facts of one connection: the hybrid handshake behind its PSK and the TLS 1.3 session.

    Holds no secret; :meth:`channel_binding` and :meth:`export_keying_material` ask the live TLS
    connection (RFC 8446 section 7.5), so both ends get the same value.

    For a reconnect, :attr:`info` describes the *parent* full handshake whose secret the reconnect
    PSK was derived from (its suite, QKD key IDs, authenticated peer); :attr:`reconnect` is True and
    :attr:`reconnect_index` says which of the parent's reconnects this is (1, 2, ...).
    """

    #: The hybrid handshake (for a reconnect: the parent's).
    info: SessionInfo
    #: The TLS 1.3 session that carries the data.
    tls: TLSInfo
    #: Whether this connection is a zero-extra-round-trip reconnect (no hybrid exchange ran on it).
    reconnect: bool = False
    #: Which reconnect of the parent session this is (None for a full handshake).
    reconnect_index: int | None = None
    _exporter: Exporter | None = field(default=None, repr=False)
    #: A steady-state connection's facts (its QKD key IDs, whether they were pre-fetched, the
    #: parent's authentication key ID): one TLS handshake, no hybrid exchange.  None otherwise.
    steady: SteadyFacts | None = None

    @property
    def version(self) -> str:
        """The TLS version (always ``"TLSv1.3"``)."""
        return self.tls.version

    @property
    def cipher(self) -> str:
        """The TLS 1.3 cipher suite."""
        return self.tls.cipher

    @property
    def group(self) -> str | None:
        """The TLS key-exchange group, e.g. ``"X25519MLKEM768"``."""
        return self.tls.group

    @property
    def post_quantum_tls(self) -> bool:
        """Whether TLS's own (EC)DHE was post-quantum hybrid (X25519MLKEM768)."""
        return self.tls.post_quantum

    @property
    def suite(self) -> str:
        """The hybrid suite that produced the PSK (the parent's for a reconnect)."""
        return self.info.suite

    @property
    def peer_identity(self) -> str:
        """The peer's identity, authenticated by the hybrid handshake (or by holding the parent
        session's secret, for a reconnect)."""
        return self.info.peer_identity

    @property
    def qkd_key_ids(self) -> tuple[str, ...]:
        """The QKD key IDs in *this connection's* PSK: a steady-state connection's own fresh key(s);
        a full handshake's; for a reconnect, the parent's (a reconnect takes no QKD key of its own)."""
        return self.steady.qkd_key_ids if self.steady is not None else self.info.qkd_key_ids

    @property
    def qkd_used(self) -> bool:
        """Whether a QKD key is part of the PSK (for a reconnect: of the parent's)."""
        return self.info.qkd_used

    def channel_binding(self) -> bytes:
        """RFC 9266 ``tls-exporter`` channel binding: 32 bytes, equal on both ends."""
        return self.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH)

    def export_keying_material(self, label: bytes, length: int, context: bytes | None = None) -> bytes:
        """An application key from the TLS exporter (RFC 8446 section 7.5), equal on both ends."""
        if self._exporter is None:
            raise LocalProtocolError("this session is not attached to a connection")
        return self._exporter(label, length, context)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict for logs: the hybrid facts, the TLS facts, the reconnect flags."""
        return {
            "hybrid": self.info.as_dict(),
            "tls": {"version": self.tls.version, "cipher": self.tls.cipher, "group": self.tls.group,
                    "role": self.tls.role, "post_quantum": self.tls.post_quantum},
            "reconnect": self.reconnect,
            "reconnect_index": self.reconnect_index,
            "steady": asdict(self.steady) if self.steady is not None else None,
        }

    def summary(self) -> str:
        """One line for humans."""
        how = f"reconnect #{self.reconnect_index} of " if self.reconnect else ""
        if self.steady is not None:
            qkd = ", ".join(self.steady.qkd_key_ids) or "no QKD key"
            how = f"steady-state connection #{self.steady.index} (QKD {qkd}) after "
        return f"{self.tls.version} {self.tls.cipher} over {self.tls.group}; PSK from {how}{self.info.summary()}"
