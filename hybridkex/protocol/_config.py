"""Per-side handshake configuration: identity, authenticators, policy, QKD place."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from ..exceptions import ConfigurationError
from ..policy import Policy, QKDConfig, QKDMode
from .auth import Authenticator, AuthMode

__all__ = ["InitiatorConfig", "ResponderConfig"]


def _check_identity(value: object, name: str) -> None:
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > 255:
        raise ConfigurationError("must be a non-empty string of at most 255 UTF-8 bytes", field=name)


def _normalise_common(obj: InitiatorConfig | ResponderConfig) -> None:
    _check_identity(obj.identity, "identity")
    auths: Sequence[Authenticator] | Authenticator = obj.authenticators
    if isinstance(auths, Authenticator):
        auths = (auths,)
    auths = tuple(auths)
    if not auths:
        raise ConfigurationError("at least one authenticator is needed (PSK or PKI)", field="authenticators")
    for a in auths:
        if not isinstance(a, Authenticator):
            raise ConfigurationError(f"{a!r} is not an Authenticator", field="authenticators")
    if len({a.mode for a in auths}) != len(auths):
        raise ConfigurationError("two authenticators for one mode", field="authenticators")
    if any(a.mode is AuthMode.RECYCLED for a in auths[1:]):
        # Otherwise the bootstrap would win every handshake and recycling would never take over.
        raise ConfigurationError("the recycled authenticator must come first (the bootstrap follows it)",
                                 field="authenticators")
    object.__setattr__(obj, "authenticators", auths)
    if not isinstance(obj.policy, Policy):
        raise ConfigurationError("must be a Policy", field="policy")
    if obj.policy.uses_qkd and obj.qkd is None:
        raise ConfigurationError(f"QKD is {obj.policy.qkd.value} but no QKDConfig (SAE and KME IDs) is given; "
                                 "set qkd=QKDConfig(...) or Policy(qkd='disabled')", field="qkd")
    if obj.qkd is not None and not isinstance(obj.qkd, QKDConfig):
        raise ConfigurationError("must be a QKDConfig", field="qkd")
    if obj.qkd is not None and obj.policy.qkd is QKDMode.DISABLED:
        raise ConfigurationError("a QKDConfig is given but the policy disables QKD", field="qkd")


@dataclass(frozen=True, slots=True)
class InitiatorConfig:
    """The initiator's configuration.

    ``authenticators`` are offered in order (e.g. ``(PKIAuthenticator(...), PSKAuthenticator(...))``);
    the responder picks one.  ``peer_identity`` is the responder identity we expect; it is required
    with certificate authentication (as a hostname is in TLS) and, when given, enforced in every mode.
    """

    identity: str
    authenticators: Sequence[Authenticator]
    policy: Policy = field(default_factory=Policy)
    qkd: QKDConfig | None = None
    peer_identity: str | None = None

    def __post_init__(self) -> None:
        _normalise_common(self)
        if self.peer_identity is not None:
            _check_identity(self.peer_identity, "peer_identity")
        elif any(a.sends_certificate for a in self.authenticators):
            raise ConfigurationError("certificate authentication needs the expected responder identity",
                                     field="peer_identity")
        if self.qkd is not None and self.qkd.master == "initiator" and self.qkd.peer_sae_id is None:
            raise ConfigurationError("an initiator that is QKD master must know the responder's SAE ID",
                                     field="qkd.peer_sae_id")


@dataclass(frozen=True, slots=True)
class ResponderConfig:
    """The responder's configuration.

    The responder picks the first of *its* suites and authenticators that the initiator offered.
    ``peer_sae_ids`` optionally pins the SAE ID each initiator identity may claim, so a Hello can
    not make this side take QKD keys for another SAE under a known peer's name.  ``admit``, if
    given, is called with the identity a Hello claims once an authenticator knows it, before any
    QKD key or KEM work; raising :class:`~hybridkex.exceptions.RateLimited` there refuses the
    handshake with Abort "rate limited" (the identity is not authenticated yet, so ``admit`` should
    only read state that authenticated handshakes build, never spend it).
    """

    identity: str
    authenticators: Sequence[Authenticator]
    policy: Policy = field(default_factory=Policy)
    qkd: QKDConfig | None = None
    peer_sae_ids: Mapping[str, str] = field(default_factory=dict)
    admit: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        _normalise_common(self)
        pins = dict(self.peer_sae_ids)
        for ident, sae in pins.items():
            _check_identity(ident, "peer_sae_ids")
            _check_identity(sae, "peer_sae_ids")
        object.__setattr__(self, "peer_sae_ids", MappingProxyType(pins))
