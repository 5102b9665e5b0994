"""Drivers that run the sans-IO handshake over real I/O.

* :mod:`hybridkex.io.sync`: blocking sockets (:func:`run_initiator`, :func:`run_responder`);
* :class:`QKDKeyManager`: answers the core's QKD requests from a key source, with the key budget
  (fresh keys or per-peer epoch keys) and the state that budget needs between handshakes.
"""

from __future__ import annotations

from .keys import KeySourceArg, QKDKeyManager
from .sync import run_initiator, run_responder

__all__ = ["KeySourceArg", "QKDKeyManager", "run_initiator", "run_responder"]
