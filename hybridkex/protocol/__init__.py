"""The authenticated hybrid handshake, as a sans-IO state machine (docs/spec.md, sections 5-10).

Three messages establish the combined key::

    Initiator                                            Responder
    Hello(suites, identity, nonce, X25519, ML-KEM ek,
          auth modes, QKD parameters)            ----->
                                                         [QKD keys from the KME, as master]
                               <-----  Response(suite, identity, nonce, X25519, ML-KEM ct, key IDs)
                                       [Certificate]  Finished(confirm, proof over transcript)
    [QKD keys by ID, as slave]
    [Certificate] Finished(confirm, proof)       ----->

No sockets, clocks, files or HTTP inside: the caller moves bytes and answers QKD requests.  A
blocking driver is :mod:`hybridkex.io.sync`.  Example (in memory)::

    ini, res = Initiator(ini_config), Responder(res_config)
    res.receive_data(ini.data_to_send())
    ...  # loop on next_event(), answering QKDKeysRequired / QKDKeysByIdRequired

Everything public is re-exported here; the underscored modules are private.
"""

from __future__ import annotations

from ._base import suite_kem
from ._config import InitiatorConfig, ResponderConfig
from ._errors import peer_abort_error
from ._initiator import Initiator
from ._responder import Responder
from ._session import Component, Session, SessionInfo
from ._state import State
from ._wire import (
    HEADER_LEN,
    MAGIC,
    MAX_RECYCLED_KEY_IDS,
    VERSION,
    AbortCode,
    CertificateMsg,
    FrameType,
    encode_abort,
)
from .auth import (
    AuthContext,
    Authenticator,
    AuthMode,
    AuthOffer,
    MACAuthenticator,
    PKIAuthenticator,
    PSKAuthenticator,
    SigningCredential,
)
from .events import (
    NEED_DATA,
    PAUSED,
    Event,
    HandshakeComplete,
    QKDKeysByIdRequired,
    QKDKeysRequired,
    Sentinel,
)

__all__ = [
    "HEADER_LEN",
    "MAGIC",
    "MAX_RECYCLED_KEY_IDS",
    "NEED_DATA",
    "PAUSED",
    "VERSION",
    "AbortCode",
    "AuthContext",
    "AuthMode",
    "AuthOffer",
    "Authenticator",
    "CertificateMsg",
    "Component",
    "Event",
    "FrameType",
    "HandshakeComplete",
    "Initiator",
    "InitiatorConfig",
    "MACAuthenticator",
    "PKIAuthenticator",
    "PSKAuthenticator",
    "QKDKeysByIdRequired",
    "QKDKeysRequired",
    "Responder",
    "ResponderConfig",
    "Sentinel",
    "Session",
    "SessionInfo",
    "SigningCredential",
    "State",
    "encode_abort",
    "peer_abort_error",
    "suite_kem",
]
