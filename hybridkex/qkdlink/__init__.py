"""A physically grounded decoy-state BB84 link, sans-IO: model, event simulation, post-processing, authentication.

Nothing here does I/O: the post-processing and the protocol ends take and return bytes and numpy
arrays, so a driver can carry the classical messages over any transport.
"""
