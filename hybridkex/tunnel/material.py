"""Everything secret or cryptographic a tunnel configuration names, read and checked in one place.

:func:`load_channel_material` is the one loader behind ``--check-config``, startup and every
SIGHUP reload, so a configuration that passes ``--check-config`` cannot fail at startup for a
file problem: PSK files (32..1024 bytes), PEM certificates and keys of ``pki`` peers and of the
KME client, that each private key belongs to its certificate (the error names the pair, e.g.
``peers[0].cert/key``), the CA files, and the KME client's TLS context.  It opens no connection;
what only the KME can tell (is it up, does it know the peer SAEs) is reported at run time.
"""

from __future__ import annotations

import binascii
import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from ..exceptions import ConfigurationError, StoreError
from ..protocol import PKIAuthenticator, PSKAuthenticator, SigningCredential
from ..protocol.auth import Authenticator, AuthMode, AuthOffer
from ..recycle import RecycledAuthenticator, RecyclePolicy, SQLiteAuthKeyStore
from ..state import PostgresState, SQLiteState
from ..state.pgkeys import PostgresAuthKeyStore
from ._state import StateConfig, open_config_state
from .config import KMEConfig, PeerConfig, TunnelConfig

if TYPE_CHECKING:
    from ..qkd import ETSI014Client

__all__ = ["MAX_PSK_BYTES", "MIN_PSK_BYTES", "ChannelMaterial", "check_channel_config", "load_channel_material",
           "load_psk_file"]

#: A PSK file holds at least 32 bytes: raw bytes, or the same as hex text (whitespace ignored).
MIN_PSK_BYTES = 32
MAX_PSK_BYTES = 1024
_HEX = frozenset(b"0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True, repr=False)
class ChannelMaterial:
    """What :func:`load_channel_material` read: authenticators (holding the keys), the SAE ID each
    peer may claim, and the KME client (built, not connected; ``None`` without QKD)."""

    authenticators: tuple[Authenticator, ...]
    peer_sae_ids: dict[str, str]
    kme_client: ETSI014Client | None = None
    #: The recycled-key store (``[recycle]``, or the ``[state]``'s), open; closing it writes its queued rotations.
    store: SQLiteAuthKeyStore | PostgresAuthKeyStore | None = None
    #: The ``[state]`` this loading opened itself (None: none, or the caller's ``open_state``).
    state: SQLiteState | PostgresState | None = None

    def close(self) -> None:
        for item in (self.kme_client, self.store, self.state):
            if item is not None:
                with contextlib.suppress(Exception):
                    item.close()


class PeerRecycledAuthenticator(RecycledAuthenticator):
    """Recycled authentication for the peers configured with ``mode = "recycled"`` only: any other
    peer is neither offered nor accepted a recycled key, and its own mode is not vetoed by the store."""

    def __init__(self, store: SQLiteAuthKeyStore, policy: RecyclePolicy, peers: frozenset[str]) -> None:
        super().__init__(store, policy)
        self._peers = peers

    def offer(self, local_identity: str, peer_identity: str | None) -> AuthOffer:
        if peer_identity is not None and peer_identity not in self._peers:
            return None  # type: ignore[return-value]  # the base class allows None: mode left out
        return super().offer(local_identity, peer_identity)

    def accept(self, local_identity: str, peer_identity: str, key_ids: tuple[bytes, ...]) -> Any:
        return super().accept(local_identity, peer_identity, key_ids) if peer_identity in self._peers else None

    def permits(self, mode: AuthMode, local_identity: str, peer_identity: str | None) -> bool:
        if peer_identity is not None and peer_identity not in self._peers:
            return mode is not AuthMode.RECYCLED
        return super().permits(mode, local_identity, peer_identity)


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


def _load_pem_key(path: Path, field: str) -> Any:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}", field=field) from None
    except (ValueError, TypeError):
        raise ConfigurationError(f"{path} is not an unencrypted PEM private key", field=field) from None


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))


def _key_pair(cert: Path, key: Path, prefix: str) -> tuple[list[x509.Certificate], Any]:
    """The certificate chain and the private key, checked to belong together (names ``PREFIX.cert/key``)."""
    chain = _load_pem_certs(cert, f"{prefix}.cert")
    private = _load_pem_key(key, f"{prefix}.key")
    try:
        matches = _spki(chain[0].public_key()) == _spki(private.public_key())
    except (ValueError, TypeError, AttributeError):  # a key type the certificate cannot even hold
        matches = False
    if not matches:
        raise ConfigurationError(f"the private key in {key} does not belong to the certificate in {cert}",
                                 field=f"{prefix}.cert/key")
    return chain, private


def _signing_credential(peer: PeerConfig, index: int) -> SigningCredential:
    assert peer.cert is not None and peer.key is not None
    chain, key = _key_pair(peer.cert, peer.key, f"peers[{index}]")
    if not isinstance(key, ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey):
        raise ConfigurationError(f"{peer.key}: only Ed25519 and ML-DSA-65 keys can sign hybridkex handshakes",
                                 field=f"peers[{index}].key")
    try:
        return SigningCredential(tuple(chain), key)
    except ConfigurationError as exc:  # e.g. a chain that is too long
        raise ConfigurationError(str(exc), field=f"peers[{index}].cert") from None


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
        if (peer.bootstrap or peer.mode) == "psk":  # a recycled peer: its bootstrap credential
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


def _kme_client(config: TunnelConfig) -> ETSI014Client | None:
    """The ETSI GS QKD 014 client for ``[kme]`` (its files checked one by one first), or ``None``."""
    kme: KMEConfig | None = config.kme
    if config.policy.qkd == "disabled":
        return None
    if kme is None:
        raise ConfigurationError("required unless policy.qkd = 'disabled'", field="kme")
    if kme.embedded:
        raise ConfigurationError(
            "the embedded simulated KME lives inside one process, so a tunnel peer in another process "
            "cannot fetch its keys; run `hybridkex kme` (or a real KME) and set kme.url, or use "
            "`hybridkex demo`, which runs both tunnel ends in one process", field="kme.embedded")
    assert kme.cert is not None and kme.key is not None and kme.ca is not None
    _key_pair(kme.cert, kme.key, "kme")
    _load_pem_certs(kme.ca, "kme.ca")
    from ..qkd import ETSI014Client  # noqa: PLC0415 - only when a KME is configured

    try:
        # A KME answer later than the handshake deadline is of no use to the handshake.
        return ETSI014Client(kme.url or "", cert=kme.cert, key=kme.key, ca=kme.ca, sae_id=kme.sae_id,
                             timeout=min(config.timeouts.handshake, 10.0), retries=kme.retries,
                             backoff=kme.backoff, max_backoff=kme.max_backoff)
    except ConfigurationError as exc:  # what the files checked above cannot show (e.g. an OpenSSL limit)
        raise ConfigurationError(str(exc), field="kme") from None


StateOpener = Callable[[StateConfig], "SQLiteState | PostgresState"]


def _store(config: TunnelConfig, *, create: bool,
           open_store: Callable[[Path], SQLiteAuthKeyStore] | None) -> SQLiteAuthKeyStore | None:
    """The ``[recycle]`` store, opened (created 0600 if absent), or with ``create=False`` only checked."""
    if config.recycle is None or config.recycle.store is None:
        return None
    path = config.recycle.store
    if not create and not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise StoreError(f"cannot create the key store {path}: {parent} is not a writable directory")
        return None
    return (open_store or SQLiteAuthKeyStore)(path)  # refuses anything that is not a hybridkex store, one line


def _state(config: TunnelConfig, *, create: bool, open_state: StateOpener | None
           ) -> tuple[SQLiteState | PostgresState | None, SQLiteState | PostgresState | None]:
    """The ``[state]``, opened (PostgreSQL: connected, schema checked), and the one this call owns.
    With ``create=False`` a missing SQLite file is only checked, like the ``[recycle]`` store."""
    cfg = config.state
    if cfg is None:
        return None, None
    if not create and not cfg.postgresql:
        path = Path(cfg.url)
        if not path.exists():
            parent = next((p for p in path.parents if p.exists()), None)
            if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise StoreError(f"cannot create the state file {path}: {parent} is not a writable directory")
            return None, None
    if open_state is not None:
        return open_state(cfg), None
    state = open_config_state(cfg)
    return state, state


def load_channel_material(config: TunnelConfig, *, kme: bool = True, create_store: bool = True,
                          open_store: Callable[[Path], SQLiteAuthKeyStore] | None = None,
                          open_state: StateOpener | None = None) -> ChannelMaterial:
    """Read every key, certificate and CA file of ``config``, open the recycled-key store (or the
    ``[state]``) and build the KME client (no I/O on the network but the state's database).
    ``kme=False`` skips the KME client (a caller that supplies its own key source);
    ``create_store=False`` checks the store's path without creating it; ``open_store`` and
    ``open_state`` open (or reuse) the store and the state instead of new ones."""
    auths, sae_ids = _authenticators(config.peers)
    state, owned = _state(config, create=create_store, open_state=open_state)
    try:
        store: SQLiteAuthKeyStore | PostgresAuthKeyStore | None = _store(config, create=create_store,
                                                                        open_store=open_store)
        if state is not None and config.recycle is not None:
            store = state.auth_keys()
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    if store is not None:
        assert config.recycle is not None
        recycled = frozenset(p.identity for p in config.peers if p.mode == "recycled")
        # First, before the bootstraps: they are used only while a pair has no recycled key in common.
        auths = (PeerRecycledAuthenticator(store, RecyclePolicy(config.recycle.policy), recycled),  # type: ignore[arg-type]
                 *auths)
    try:
        client = _kme_client(config) if kme else None
    except BaseException:
        if store is not None and open_store is None and state is None:
            store.close()
        if owned is not None:
            owned.close()
        raise
    # A store that is the state's is closed with it (the state's own connection).
    return ChannelMaterial(auths, sae_ids, client, None if state is not None else store, owned)


def check_channel_config(config: TunnelConfig) -> None:
    """What ``--check-config`` runs after the schema: the same loading as startup (an existing store is
    opened and validated, a missing one is not created), then nothing is kept."""
    load_channel_material(config, create_store=False).close()
