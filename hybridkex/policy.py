"""Policy: what a side accepts, as frozen, self-validating objects.

* :class:`Policy`: allowed suites (in preference order), the QKD mode (``required``,
  ``optional``, ``disabled``), the QKD key budget and the timeouts drivers apply.
* :class:`KeyBudget`: ``fresh`` (every handshake consumes new QKD keys) or ``epoch`` (one QKD key
  per peer pair per interval or per N handshakes, mixed with each handshake's own X25519 and
  ML-KEM secrets); see docs/spec.md, "QKD key budget", for the trade-off in numbers.
* :class:`QKDConfig`: this side's ETSI GS QKD 014 identity (SAE ID, KME ID) and who is master.

Everything offered is carried in the authenticated transcript, so an active attacker can neither
downgrade the suite nor strip QKD: a session without QKD happens only when *both* policies allow
it, and then :class:`~hybridkex.protocol.SessionInfo` says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from .exceptions import ConfigurationError
from .suites import DEFAULT_SUITE, Suite, get_suite

__all__ = ["KeyBudget", "Policy", "QKDConfig", "QKDMode", "Timeouts"]


class QKDMode(StrEnum):
    """Whether a QKD key must, may or must not be part of the combined key."""

    #: Every session mixes in a QKD key; the handshake fails with a clear error if none is available.
    REQUIRED = "required"
    #: Prefer QKD; when the key source cannot deliver, run the no-QKD sibling suite (a different,
    #: domain-separated suite) and say so in SessionInfo.  Never silent.
    OPTIONAL = "optional"
    #: Never use QKD (no KME configured).
    DISABLED = "disabled"


def _positive_or_none(value: Any, name: str, *, integer: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise ConfigurationError(f"must be a {'whole' if integer else ''} number or None, got {value!r}",
                                 field=name)
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"must be positive, got {value!r}", field=name)


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """How QKD keys are spent.

    ``mode="fresh"``: as ETSI master, take new keys for every handshake; as slave, accept only
    keys never used before.  ``mode="epoch"``: as master, keep one key per peer pair in memory and
    reuse it for up to ``epoch_max_handshakes`` handshakes or ``epoch_max_age`` seconds, whichever
    comes first; as slave, accept such keys too (and enforce the same limits on the cache).  Fresh
    keys are always acceptable.
    """

    mode: Literal["fresh", "epoch"] = "fresh"
    #: Most handshakes one epoch key may serve (None: no count limit).
    epoch_max_handshakes: int | None = 1000
    #: Longest an epoch key may be used, in seconds from when it was taken (None: no time limit).
    epoch_max_age: float | None = 300.0

    def __post_init__(self) -> None:
        if self.mode not in ("fresh", "epoch"):
            raise ConfigurationError(f"must be 'fresh' or 'epoch', not {self.mode!r}", field="key_budget.mode")
        _positive_or_none(self.epoch_max_handshakes, "key_budget.epoch_max_handshakes", integer=True)
        _positive_or_none(self.epoch_max_age, "key_budget.epoch_max_age", integer=False)
        if self.mode == "epoch" and self.epoch_max_handshakes is None and self.epoch_max_age is None:
            raise ConfigurationError("epoch mode needs epoch_max_handshakes or epoch_max_age (or both)",
                                     field="key_budget")

    @property
    def accepted_usages(self) -> frozenset[str]:
        """Key usages this side accepts from a master peer."""
        return frozenset({"fresh", "epoch"}) if self.mode == "epoch" else frozenset({"fresh"})


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines, in seconds, that drivers apply (the sans-IO core has no clock for them)."""

    #: The whole handshake, from the first byte to the session.
    handshake: float = 10.0
    #: One call to the key source (KME request).
    kme: float = 5.0

    def __post_init__(self) -> None:
        _positive_or_none(self.handshake, "timeouts.handshake", integer=False)
        _positive_or_none(self.kme, "timeouts.kme", integer=False)
        if self.handshake is None or self.kme is None:
            raise ConfigurationError("timeouts must be numbers", field="timeouts")


def _default_suites(mode: QKDMode) -> tuple[Suite, ...]:
    if mode is QKDMode.DISABLED:
        return (DEFAULT_SUITE.without_qkd(),)
    return (DEFAULT_SUITE,)


@dataclass(frozen=True, slots=True)
class Policy:
    """What this side accepts.

    ``suites`` (names or :class:`~hybridkex.suites.Suite`, preferred first) defaults to the default
    suite (``x25519-mlkem768-qkd-hkdfsha256``), or its no-QKD sibling when QKD is disabled.  The
    list is checked against ``qkd``: ``required`` allows only QKD suites, ``disabled`` only suites
    without QKD, and ``optional`` appends the no-QKD sibling of every QKD suite (after all given
    suites) so the fallback is a distinct suite.  After construction ``suites`` is the normalised
    tuple of :class:`Suite` that is actually offered/accepted.
    """

    suites: Sequence[Suite | str] = field(default=())
    qkd: QKDMode = QKDMode.REQUIRED
    key_budget: KeyBudget = field(default_factory=KeyBudget)
    timeouts: Timeouts = field(default_factory=Timeouts)

    def __post_init__(self) -> None:
        try:
            mode = QKDMode(self.qkd)
        except ValueError:
            raise ConfigurationError(f"must be one of {', '.join(m.value for m in QKDMode)}, not {self.qkd!r}",
                                     field="policy.qkd") from None
        object.__setattr__(self, "qkd", mode)
        if not isinstance(self.key_budget, KeyBudget):
            raise ConfigurationError("must be a KeyBudget", field="policy.key_budget")
        if not isinstance(self.timeouts, Timeouts):
            raise ConfigurationError("must be a Timeouts", field="policy.timeouts")
        raw: Sequence[str | Suite] = self.suites
        if isinstance(raw, str | Suite):
            raw = (raw,)
        suites = [get_suite(s) for s in raw] if raw else list(_default_suites(mode))
        if len({s.name for s in suites}) != len(suites):
            raise ConfigurationError("a suite is listed twice", field="policy.suites")
        if mode is QKDMode.REQUIRED and (bad := [s.name for s in suites if not s.qkd]):
            raise ConfigurationError(f"QKD is required but {', '.join(bad)} has no QKD component; remove it "
                                     "or set qkd='optional'", field="policy.suites")
        if mode is QKDMode.DISABLED and (bad := [s.name for s in suites if s.qkd]):
            raise ConfigurationError(f"QKD is disabled but {', '.join(bad)} needs a QKD key; use its no-QKD "
                                     "sibling or set qkd='optional'", field="policy.suites")
        if mode is QKDMode.OPTIONAL:
            for s in list(suites):
                sibling = s.without_qkd()
                if s.qkd and sibling not in suites:
                    suites.append(sibling)
        if len(suites) > 16:
            raise ConfigurationError("at most 16 suites", field="policy.suites")
        object.__setattr__(self, "suites", tuple(suites))

    @property
    def allowed_suites(self) -> tuple[Suite, ...]:
        """The normalised suites, preferred first (the same objects as ``suites``)."""
        return tuple(get_suite(s) for s in self.suites)

    @property
    def uses_qkd(self) -> bool:
        """Whether this side ever uses a QKD key."""
        return self.qkd is not QKDMode.DISABLED


@dataclass(frozen=True, slots=True)
class QKDConfig:
    """This side's place in the QKD network (ETSI GS QKD 014).

    ``master`` names the side that calls "Get key" (default: the responder, which can keep a
    pre-fetched pool); the other side fetches the same keys by ID.  Both sides must be configured
    with the same ``master``.  An initiator that is master must know the responder's SAE ID
    (``peer_sae_id``) before it says hello.  ``key_size_bits`` is the size of each key requested
    from the KME; a suite's 256-bit QKD component is made of ``256 / key_size_bits`` keys.
    """

    sae_id: str
    kme_id: str
    master: Literal["responder", "initiator"] = "responder"
    peer_sae_id: str | None = None
    key_size_bits: int = 256

    def __post_init__(self) -> None:
        for name in ("sae_id", "kme_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value.encode("utf-8")) > 255:
                raise ConfigurationError("must be a non-empty string of at most 255 bytes", field=f"qkd.{name}")
        if self.peer_sae_id is not None and (not self.peer_sae_id or len(self.peer_sae_id.encode("utf-8")) > 255):
            raise ConfigurationError("must be a non-empty string of at most 255 bytes", field="qkd.peer_sae_id")
        if self.master not in ("responder", "initiator"):
            raise ConfigurationError(f"must be 'responder' or 'initiator', not {self.master!r}", field="qkd.master")
        if (isinstance(self.key_size_bits, bool) or not isinstance(self.key_size_bits, int)
                or self.key_size_bits not in (32, 64, 128, 256)):
            raise ConfigurationError("must be 32, 64, 128 or 256 (a divisor of 256)", field="qkd.key_size_bits")

    @classmethod
    def from_key_source(cls, source: Any, **kwargs: Any) -> QKDConfig:
        """Take ``sae_id`` and ``kme_id`` from a :class:`~hybridkex.qkd.KeySource`."""
        return cls(sae_id=source.sae_id, kme_id=source.kme_id, **kwargs)
