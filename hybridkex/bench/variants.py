"""The handshakes compared, as data.

Baselines are what users run today; the hybridkex variants vary one thing at a time against the
headline ``hybridkex`` (PSK authentication, the default suite X25519 + ML-KEM-768 + QKD, QKD keys
from a key pool over the simulated KME, ``fresh`` key budget).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..exceptions import ConfigurationError

__all__ = ["KME_DELAYS_MS", "VARIANTS", "Variant", "select", "suite_variant"]

Kind = Literal["stdlib-cert", "pyopenssl-cert", "tls-psk", "hybridkex"]
QKDSource = Literal["pool", "direct", "memory", "none"]

#: Simulated KME answer delays for the pooled/unpooled comparison (issue item h).
KME_DELAYS_MS: tuple[int, ...] = (0, 1, 5, 20)

DEFAULT_SUITE_NAME = "x25519-mlkem768-qkd-hkdfsha256"
NO_QKD_SUITE_NAME = "x25519-mlkem768-hkdfsha256"
MLKEM1024_SUITE_NAME = "x25519-mlkem1024-qkd-hkdfsha384"


@dataclass(frozen=True)
class Variant:
    """One handshake configuration."""

    #: Stable id (JSON key, ``--variants`` selector).
    id: str
    #: One line for the table.
    label: str
    #: The issue's item letter(s) it answers.
    item: str
    kind: Kind
    #: TLS group list (baselines); None: the library's default.
    groups: str | None = None
    #: hybridkex: authentication mode.
    auth: str = "psk"
    #: hybridkex: suite name.
    suite: str = DEFAULT_SUITE_NAME
    #: hybridkex: where QKD keys come from.
    qkd: QKDSource = "pool"
    #: hybridkex: simulated KME answer delay in milliseconds.
    kme_delay_ms: int = 0
    #: hybridkex: key budget.
    budget: Literal["fresh", "epoch"] = "fresh"
    #: hybridkex: reconnects on (the measured connections are reconnects of one full handshake).
    reconnect: bool = False
    #: hybridkex: the steady state on (the measured connections follow one full handshake).
    steady: bool = False
    #: hybridkex: the TLS layer's key-exchange groups (TLSOptions.groups); None: the default.
    tls_groups: str | None = None

    @property
    def is_hybridkex(self) -> bool:
        return self.kind == "hybridkex"

    @property
    def uses_kme(self) -> bool:
        return self.is_hybridkex and self.qkd in ("pool", "direct")

    @property
    def loopback(self) -> bool:
        """Whether the variant runs over loopback (an in-memory key link cannot cross processes)."""
        return self.qkd != "memory"

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {"id": self.id, "label": self.label, "item": self.item, "kind": self.kind}
        if self.is_hybridkex:
            d.update(auth=self.auth, suite=self.suite, qkd=self.qkd, kme_delay_ms=self.kme_delay_ms,
                     key_budget=self.budget, reconnect=self.reconnect, steady=self.steady,
                     tls_groups=self.tls_groups)
        else:
            d["groups"] = self.groups
        return d


def _hybrid(vid: str, label: str, item: str, **kw: object) -> Variant:
    return Variant(vid, label, item, "hybridkex", **kw)  # type: ignore[arg-type]


def _build() -> tuple[Variant, ...]:
    out = [
        Variant("stdlib-cert", "stdlib ssl, ECDSA P-256 certificate (system OpenSSL, default group)", "a",
                "stdlib-cert"),
        Variant("pyopenssl-cert-x25519", "pyOpenSSL, ECDSA P-256 certificate, X25519", "b", "pyopenssl-cert",
                groups="X25519"),
        Variant("pyopenssl-cert-x25519mlkem768", "pyOpenSSL, ECDSA P-256 certificate, X25519MLKEM768", "c",
                "pyopenssl-cert", groups="X25519MLKEM768"),
        Variant("tls-psk", "TLS 1.3 external PSK alone (psk_dhe_ke, hybridkex.tls defaults)", "d", "tls-psk"),
        _hybrid("hybridkex", "hybridkex, PSK auth, X25519+ML-KEM-768+QKD (pool)", "e"),
        _hybrid("hybridkex-pki-ed25519", "hybridkex, Ed25519 certificates", "e", auth="pki-ed25519"),
        _hybrid("hybridkex-pki-mldsa65", "hybridkex, ML-DSA-65 certificates", "e", auth="pki-mldsa65"),
        _hybrid("hybridkex-pki-hybrid", "hybridkex, Ed25519 + ML-DSA-65 certificates", "e", auth="pki-hybrid"),
        _hybrid("hybridkex-recycled", "hybridkex, recycled authentication keys (SQLite store)", "e",
                auth="recycled"),
        _hybrid("hybridkex-memory-qkd", "hybridkex, PSK auth, QKD from an in-memory link (no KME)", "e",
                qkd="memory"),
        _hybrid("hybridkex-no-qkd", "hybridkex without QKD (X25519+ML-KEM-768)", "f", suite=NO_QKD_SUITE_NAME,
                qkd="none"),
        _hybrid("hybridkex-mlkem1024", "hybridkex, X25519+ML-KEM-1024+QKD, SHA-384 (pool)", "g",
                suite=MLKEM1024_SUITE_NAME),
    ]
    for ms in KME_DELAYS_MS:
        if ms:  # at 0 ms the pooled variant is the headline "hybridkex"
            out.append(_hybrid(f"hybridkex-kme{ms}ms-pool", f"hybridkex, KME +{ms} ms, pooled keys", "h",
                               kme_delay_ms=ms))
        out.append(_hybrid(f"hybridkex-kme{ms}ms-direct", f"hybridkex, KME +{ms} ms, no pool", "h",
                           qkd="direct", kme_delay_ms=ms))
    out += [
        _hybrid("hybridkex-epoch", "hybridkex, epoch key budget (pool)", "i", budget="epoch"),
        _hybrid("hybridkex-epoch-kme5ms", "hybridkex, epoch key budget, KME +5 ms (pool)", "i", budget="epoch",
                kme_delay_ms=5),
        _hybrid("hybridkex-reconnect", "hybridkex reconnect: TLS only, PSK from an earlier session", "+",
                reconnect=True),
        _hybrid("hybridkex-1rtt", "hybridkex steady state: one TLS handshake, fresh announced QKD key", "1rtt",
                steady=True),
        _hybrid("hybridkex-1rtt-kme5ms", "hybridkex steady state, KME +5 ms", "1rtt", steady=True, kme_delay_ms=5),
        _hybrid("hybridkex-tls-x25519", "hybridkex, TLS layer with X25519 only (TLSOptions(groups=...))", "+",
                tls_groups="X25519"),
    ]
    return tuple(out)


#: Every variant, in display order.
VARIANTS: tuple[Variant, ...] = _build()

#: Ids the report's goals need (always measured when present in the selection).
REQUIRED_IDS = ("stdlib-cert", "pyopenssl-cert-x25519mlkem768", "tls-psk", "hybridkex")


def suite_variant(suite: str) -> Variant:
    """The headline ``hybridkex`` handshake with another suite (``hybridkex bench --suites``)."""
    qkd: QKDSource = "pool" if "-qkd-" in suite else "none"
    return _hybrid(f"hybridkex-suite-{suite}", f"hybridkex, suite {suite} ({'pool' if qkd == 'pool' else 'no QKD'})",
                   "suite", suite=suite, qkd=qkd)


def select(patterns: Iterable[str] | None, suites: Iterable[str] = ()) -> tuple[Variant, ...]:
    """The variants whose id matches any of ``patterns`` (shell wildcards); all when None; then one
    :func:`suite_variant` per name in ``suites``."""
    extra = tuple(suite_variant(name) for name in suites)
    if patterns is None:
        return VARIANTS + extra
    pats = [p.strip() for p in patterns if p.strip()]
    chosen = tuple(v for v in VARIANTS if any(fnmatch.fnmatchcase(v.id, p) for p in pats))
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(v.id, p) for v in VARIANTS)]
    if unknown:
        raise ConfigurationError(f"no variant matches {', '.join(unknown)}; known: {', '.join(v.id for v in VARIANTS)}",
                                 field="variants")
    return chosen + extra
