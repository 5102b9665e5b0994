"""Recycled authentication in the tunnel configuration: ``mode = "recycled"`` peers and ``[recycle]``.

A recycled peer names its bootstrap (``bootstrap = "psk"`` with ``psk_file``, or ``"pki"`` with
``cert``/``key``/``ca``), which authenticates the pair's first handshake; later handshakes use keys
recycled from earlier ones (docs/recycle.md), kept in the one store of ``[recycle] store``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, get_args

from ..exceptions import ConfigurationError
from ..recycle import BootstrapPolicy

if TYPE_CHECKING:
    from ._table import Table
    from .config import ConfigWarning, PeerConfig, _Validator

__all__ = ["BOOTSTRAPS", "RecycleConfig", "recycle_table", "recycled_peer"]

BOOTSTRAPS: Final = ("psk", "pki")
POLICIES: Final[tuple[str, ...]] = get_args(BootstrapPolicy)


@dataclass(frozen=True, slots=True)
class RecycleConfig:
    """``[recycle]``: where this side keeps its recycled keys, and when a bootstrap is still accepted.

    ``store`` is None when ``[state]`` holds the keys (docs/fleet.md)."""

    store: Path | None
    policy: str = "bootstrap-once"


def recycled_peer(v: _Validator, t: Table, ident: str, sae_id: str | None) -> PeerConfig:
    if not t.has("bootstrap"):
        raise ConfigurationError('missing required key with mode = "recycled"; set bootstrap = "psk" (with '
                                 'psk_file) or "pki" (with cert, key, ca): it authenticates the first handshake',
                                 field=t.name("bootstrap"))
    bootstrap = t.choice("bootstrap", BOOTSTRAPS, "psk")
    for k in ("cert", "key", "ca") if bootstrap == "psk" else ("psk_file",):
        t.forbid(k, f'with bootstrap = "{bootstrap}" (it belongs to bootstrap = '
                    f'"{"pki" if bootstrap == "psk" else "psk"}")')
    peer = v.psk_peer(t, ident, sae_id) if bootstrap == "psk" else v.pki_peer(t, ident, sae_id)
    return dataclasses.replace(peer, mode="recycled", bootstrap=bootstrap)


def recycle_table(v: _Validator, top: Table, peers: tuple[PeerConfig, ...],
                  warnings: list[ConfigWarning], warning: type[ConfigWarning]) -> RecycleConfig | None:
    recycled = [i for i, p in enumerate(peers) if p.mode == "recycled"]
    shared = top.has("state")
    if shared:  # the keys live in the shared state; [recycle] may still name the policy
        t = top.table("recycle") if top.has("recycle") else None
        if t is not None:
            t.forbid("store", "with [state] (the recycled keys are kept in the shared state)")
        policy = t.choice("policy", POLICIES, "bootstrap-once") if t is not None else "bootstrap-once"
        return RecycleConfig(store=None, policy=policy) if recycled else None
    if not top.has("recycle"):
        if recycled:
            raise ConfigurationError('missing; a peer with mode = "recycled" needs [recycle] store = "PATH" '
                                     "(this side's key store, created 0600 on first use)",
                                     field=f"peers[{recycled[0]}].mode")
        return None
    t = top.table("recycle")
    raw = t.string("store", hint='set store = "PATH" (a file this side creates and keeps, e.g. '
                                 '"/var/lib/hybridkex/tunnel-keys.sqlite3")')
    store = Path(raw).expanduser()
    if not store.is_absolute():
        store = v._base_for("recycle.store") / store
    if store.exists() and not store.is_file():
        raise ConfigurationError(f"not a regular file: {store}", field="recycle.store")
    policy = t.choice("policy", POLICIES, "bootstrap-once")
    if not recycled:
        warnings.append(warning("recycle", 'no peer has mode = "recycled"; [recycle] is not used'))
    return RecycleConfig(store=store, policy=policy)
