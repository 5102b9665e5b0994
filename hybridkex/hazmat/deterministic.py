"""Fully deterministic handshakes, for known-answer vectors (tests/vectors/generate_handshake_v1.py).

.. danger::
   Hazardous materials.  A handshake is only secure with fresh randomness.  The protocol core already
   takes its nonces, X25519 keys and ML-KEM key-generation seeds from an injectable ``randbytes``;
   the one random input it cannot take from there is the ML-KEM *encapsulation* randomness, which
   ``cryptography`` draws inside OpenSSL.  This module replaces that one operation on one
   :class:`~hybridkex.protocol.Responder` object, so that two runs produce the same bytes.  Nothing in
   hybridkex calls it: no driver, server or configuration can turn it on.
"""

from __future__ import annotations

from collections.abc import Callable

from ..exceptions import LocalProtocolError
from ..protocol import Responder, State

__all__ = ["Encapsulate", "derandomize_encapsulation"]

#: ``encapsulate(kem_name, encapsulation_key) -> (shared_secret, ciphertext)``, e.g. FIPS 203
#: ML-KEM.Encaps_internal(ek, m) with a fixed ``m``.
Encapsulate = Callable[[str, bytes], tuple[bytes, bytes]]


def derandomize_encapsulation(responder: Responder, encapsulate: Encapsulate) -> None:
    """Make ``responder`` take its KEM shared secret and ciphertext from ``encapsulate``.

    Call it before the Hello arrives.  The peer's encapsulation key is still checked as usual
    first, and the result's sizes are checked; a wrong ciphertext makes key confirmation fail.
    """
    if not isinstance(responder, Responder):
        raise TypeError("derandomize_encapsulation needs a Responder")
    if responder.state is not State.WAIT_HELLO:
        raise LocalProtocolError("derandomize_encapsulation must be called before the Hello is received")
    if not callable(encapsulate):
        raise TypeError("encapsulate must be callable")
    responder._encapsulate_with = encapsulate
