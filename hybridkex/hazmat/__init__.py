"""Low-level building blocks: KEMs, KDFs, encodings, labels.

.. danger::
   This is the "hazardous materials" layer.  These functions do exactly what they say and check
   lengths, but they do not bind inputs to a protocol, authenticate anybody, or stop you from
   reusing a key.  Use :func:`hybridkex.combine` and the handshake APIs unless you are implementing
   or verifying a protocol.
"""
