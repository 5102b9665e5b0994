"""A simulated ETSI GS QKD 014 KME pair for development, demos and CI.

* :mod:`.store`: the QKD link model and the key store (plain classes, a lock, no HTTP);
* :mod:`.app`: the aiohttp application of one KME (a thin layer over the store);
* :mod:`.pair`: both KMEs over HTTPS with mutual TLS, in an event loop or a background thread;
* :mod:`.openapi`: the OpenAPI 3.1 description each KME publishes at ``/api/v1/openapi.json``.
* :mod:`.metrics`: each KME's Prometheus metrics (its own registry), served at ``/metrics`` on a
  plain-HTTP listener of its own when the pair runs with ``metrics=True``.
"""

from .app import OPENAPI_PATH, caller_sae_id, create_kme_app, server_ssl_context
from .openapi import openapi_document
from .pair import DEFAULT_CAPACITY_BITS, DEFAULT_RATE_BPS, KMEPairServer, KMEPairSettings, SimulatedKMEPair
from .store import KeyStore, KMELimits, QKDLinkModel, StoreStats

__all__ = [
    "DEFAULT_CAPACITY_BITS",
    "DEFAULT_RATE_BPS",
    "OPENAPI_PATH",
    "KMELimits",
    "KMEPairServer",
    "KMEPairSettings",
    "KeyStore",
    "QKDLinkModel",
    "SimulatedKMEPair",
    "StoreStats",
    "caller_sae_id",
    "create_kme_app",
    "openapi_document",
    "server_ssl_context",
]
