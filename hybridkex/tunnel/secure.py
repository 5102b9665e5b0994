"""The tunnel's real channel: the hybridkex handshake followed by TLS 1.3 with the combined PSK.

:func:`build_channel_factory` turns a :class:`~hybridkex.tunnel.config.TunnelConfig` into the
library's configuration objects (authenticators from the peers' key files and certificates, the
policy, the QKD place and a key source for the KME) and returns a :class:`HybridChannelFactory`
that the runtime calls for every connection.  Everything secret is read here, once per (re)load,
and kept only inside the authenticators; logs get :attr:`HybridStream.session_facts`, which holds
no key material.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from ..exceptions import ConfigurationError
from ..io.aio import HybridStreamReader, HybridStreamWriter, ServerSide, accept_on_streams, connect_on_streams
from ..io.config import ClientConfig, ServerConfig, TLSOptions
from ..policy import KeyBudget, Policy, QKDConfig, QKDMode, Timeouts
from ..protocol import InitiatorConfig, PKIAuthenticator, PSKAuthenticator, ResponderConfig, SigningCredential
from ..protocol.auth import Authenticator
from .channel import PlainStream
from .config import KMEConfig, PeerConfig, TunnelConfig
from .metrics import TunnelMetrics

__all__ = ["HybridChannelFactory", "HybridStream", "build_channel_factory", "load_psk_file"]

_log = logging.getLogger("hybridkex.tunnel")

#: A PSK file holds at least 32 bytes: raw bytes, or the same as hex text (whitespace ignored).
MIN_PSK_BYTES = 32
MAX_PSK_BYTES = 1024
_HEX = frozenset(b"0123456789abcdefABCDEF")


def load_psk_file(path: Path, field: str) -> bytes:
    """Read a PSK file: hex text (``hybridkex genpsk``) or raw bytes, 32..1024 bytes.

    Errors name the field and the file, never the key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}", field=field) from None
    digits = b"".join(data.split())
    key = binascii.unhexlify(digits) if digits and len(digits) % 2 == 0 and set(digits) <= _HEX else data
    if not MIN_PSK_BYTES <= len(key) <= MAX_PSK_BYTES:
        raise ConfigurationError(f"{path} holds {len(key)} bytes; a PSK must be {MIN_PSK_BYTES}..{MAX_PSK_BYTES} "
                                 "bytes (create one with `hybridkex genpsk FILE`)", field=field)
    return key


def _load_pem_certs(path: Path, field: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}", field=field) from None
    except ValueError:
        raise ConfigurationError(f"{path} holds no PEM certificate", field=field) from None
    return certs


def _signing_credential(peer: PeerConfig, index: int) -> SigningCredential:
    assert peer.cert is not None and peer.key is not None
    chain = _load_pem_certs(peer.cert, f"peers[{index}].cert")
    try:
        key = serialization.load_pem_private_key(peer.key.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {peer.key}: {exc.strerror or exc}",
                                 field=f"peers[{index}].key") from None
    except (ValueError, TypeError):
        raise ConfigurationError(f"{peer.key} is not an unencrypted PEM private key",
                                 field=f"peers[{index}].key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey):
        raise ConfigurationError(f"{peer.key}: only Ed25519 and ML-DSA-65 keys can sign hybridkex handshakes",
                                 field=f"peers[{index}].key")
    return SigningCredential(tuple(chain), key)


def _authenticators(peers: Sequence[PeerConfig]) -> tuple[tuple[Authenticator, ...], dict[str, str]]:
    """One authenticator per mode for all peers, and the SAE ID each peer identity may claim."""
    psk_keys: dict[str, bytes] = {}
    pki_peers: list[str] = []
    anchors: list[x509.Certificate] = []
    creds: dict[str, SigningCredential] = {}
    sae_ids: dict[str, str] = {}
    own_cert: tuple[Path, Path] | None = None
    for i, peer in enumerate(peers):
        if peer.sae_id:
            sae_ids[peer.identity] = peer.sae_id
        if peer.mode == "psk":
            assert peer.psk_file is not None
            psk_keys[peer.identity] = load_psk_file(peer.psk_file, f"peers[{i}].psk_file")
            continue
        assert peer.cert is not None and peer.key is not None and peer.ca is not None
        if own_cert is not None and own_cert != (peer.cert, peer.key):
            raise ConfigurationError("every pki peer must use this side's same cert and key",
                                     field=f"peers[{i}].cert")
        own_cert = (peer.cert, peer.key)
        cred = _signing_credential(peer, i)
        creds[cred.algorithm.name.lower()] = cred
        anchors.extend(_load_pem_certs(peer.ca, f"peers[{i}].ca"))
        pki_peers.append(peer.identity)
    auths: list[Authenticator] = []
    if creds:
        try:
            auths.append(PKIAuthenticator(anchors, allowed_peers=pki_peers, **creds))
        except ConfigurationError as exc:
            raise ConfigurationError(str(exc), field="peers (pki)") from None
    if psk_keys:
        auths.append(PSKAuthenticator(psk_keys))
    return tuple(auths), sae_ids


def _policy(config: TunnelConfig) -> Policy:
    timeouts = Timeouts(handshake=config.timeouts.handshake, kme=min(config.timeouts.handshake, 10.0))
    return Policy(suites=config.policy.suites, qkd=QKDMode(config.policy.qkd),
                  key_budget=KeyBudget(mode=config.policy.key_budget), timeouts=timeouts)


def _session_facts(session: Any) -> dict[str, object]:
    """What the tunnel logs about a connection: negotiated facts, never keys."""
    info = session.info
    return {
        "peer_identity": info.peer_identity,  # the runtime also puts it on connection_closed
        "suite": info.suite,
        "components": [f"{c.name}:{c.secret_bytes * 8}" for c in info.components],
        "auth": info.auth_mode,
        "qkd": info.qkd_usage if info.qkd_used else f"none ({info.qkd_note})",
        "qkd_key_ids": list(info.qkd_key_ids),
        "tls_group": session.group,
        "tls_cipher": session.cipher,
        "reconnect": session.reconnect,
    }


class HybridStream(PlainStream):
    """A verified hybridkex connection as the tunnel relay uses it.

    The hybrid streams have asyncio's stream interface, so the relay adapter is the same as for
    plain TCP; this adds the session and its loggable facts.
    """

    def __init__(self, reader: HybridStreamReader, writer: HybridStreamWriter) -> None:
        super().__init__(cast(asyncio.StreamReader, reader), cast(asyncio.StreamWriter, writer),
                         _session_facts(writer.session))
        self.session = writer.session


class HybridChannelFactory:
    """Runs the hybridkex handshake and TLS for each tunnel connection (server or client role)."""

    def __init__(self, config: TunnelConfig, metrics: TunnelMetrics | None, *, key_source: Any = None) -> None:
        self._metrics = metrics
        self._external_source = key_source
        self._owned: list[Any] = []
        self._server: ServerSide | None = None
        self._client: ClientConfig | None = None
        self._source: Any = None
        self._apply(config)

    # -- configuration ----------------------------------------------------------------------------

    def _key_source(self, config: TunnelConfig, peer_sae_ids: Sequence[str]) -> Any:
        if self._external_source is not None or config.policy.qkd == "disabled":
            return self._external_source
        kme: KMEConfig | None = config.kme
        if kme is None:
            raise ConfigurationError("required unless policy.qkd = 'disabled'", field="kme")
        if kme.embedded:
            raise ConfigurationError(
                "the embedded simulated KME lives inside one process, so a tunnel peer in another process "
                "cannot fetch its keys; run `hybridkex kme` (or a real KME) and set kme.url, or use "
                "`hybridkex demo`, which runs both tunnel ends in one process", field="kme.embedded")
        from ..qkd import ETSI014Client, KeyPool  # noqa: PLC0415 - only when a real KME is configured

        client = ETSI014Client(kme.url or "", cert=kme.cert, key=kme.key, ca=kme.ca, sae_id=kme.sae_id)
        self._owned.append(client)
        if config.role == "server":  # ETSI master: keep a pool so handshakes never wait on the KME
            pool = KeyPool(client, peer_sae_ids)
            self._owned.append(pool)
            return pool
        return client

    def _apply(self, config: TunnelConfig) -> None:
        auths, sae_ids = _authenticators(config.peers)
        policy = _policy(config)
        source = self._key_source(config, sorted(set(sae_ids.values())))
        qkd = None
        if policy.uses_qkd:
            if source is None:
                raise ConfigurationError("QKD is enabled but no key source is configured", field="kme")
            target_peer = self._target_peer(config)
            qkd = QKDConfig.from_key_source(
                source, peer_sae_id=target_peer.sae_id if target_peer is not None else None)
        tls = TLSOptions()
        timeout = config.timeouts.handshake + 5.0
        if config.role == "server":
            responder = ResponderConfig(config.identity, auths, policy=policy, qkd=qkd, peer_sae_ids=sae_ids)
            old = self._server
            self._server = ServerSide(ServerConfig(responder, tls=tls, timeout=timeout), key_source=source)
            if old is not None:
                old.close()
        else:
            peer = self._target_peer(config)
            assert peer is not None
            initiator = InitiatorConfig(config.identity, auths, policy=policy, qkd=qkd, peer_identity=peer.identity)
            self._client = ClientConfig(initiator, tls=tls, timeout=timeout)
        self._source = source

    @staticmethod
    def _target_peer(config: TunnelConfig) -> PeerConfig | None:
        if config.role != "client":
            return None
        wanted = config.target_identity or (config.peers[0].identity if len(config.peers) == 1 else None)
        for p in config.peers:
            if p.identity == wanted:
                return p
        raise ConfigurationError(f"no peer named {wanted!r}", field="target_identity")

    # -- ChannelFactory ---------------------------------------------------------------------------

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     peer_addr: str) -> HybridStream:
        if self._server is None:
            raise ConfigurationError("this channel factory is configured for the client role", field="role")
        hreader, hwriter = await accept_on_streams(reader, writer, self._server)
        self._report_pool()
        return HybridStream(hreader, hwriter)

    async def connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> HybridStream:
        if self._client is None:
            raise ConfigurationError("this channel factory is configured for the server role", field="role")
        hreader, hwriter = await connect_on_streams(reader, writer, self._client, key_source=self._source)
        return HybridStream(hreader, hwriter)

    async def reconfigure(self, config: TunnelConfig) -> None:
        """Apply a reloaded configuration to new connections; open ones are not touched."""
        owned, self._owned = self._owned, []
        try:
            # Building the config may contact the KME (to learn its ID): keep it off the event loop.
            await asyncio.to_thread(self._apply, config)
        except BaseException:
            for item in self._owned:
                _close(item)
            self._owned = owned
            raise
        for item in owned:
            _close(item)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for item in self._owned:
            _close(item)
        self._owned = []

    def _report_pool(self) -> None:
        stats = getattr(self._source, "stats", None)
        if self._metrics is None or stats is None:
            return
        with contextlib.suppress(Exception):  # metrics must never break a connection
            for peer, level in stats().levels.items():
                self._metrics.set_qkd_pool_level(peer, level)


def _close(item: Any) -> None:
    with contextlib.suppress(Exception):
        item.close()


async def build_channel_factory(config: TunnelConfig, metrics: TunnelMetrics) -> HybridChannelFactory:
    """The provider the tunnel CLI calls (see :data:`hybridkex.tunnel.channel.SECURE_MODULE`)."""
    return await asyncio.to_thread(HybridChannelFactory, config, metrics)
