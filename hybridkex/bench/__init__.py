"""Handshake-cost benchmarks: what hybridkex costs against what users run today, in one run.

``hybridkex bench`` (or ``python benchmarks/bench_handshakes.py``) measures TLS 1.3 baselines
(stdlib ``ssl`` and pyOpenSSL with certificates, TLS-PSK alone) and hybridkex variants (every
authentication mode, without QKD, ML-KEM-1024, pooled and unpooled QKD keys at several KME
latencies, ``fresh`` and ``epoch`` key budgets) on one machine, and reports ratios against the
baselines measured in the same run.  See docs/benchmarks.md.

Modules: :mod:`.variants` (what is compared), :mod:`.env` and :mod:`.endpoints` (both ends),
:mod:`.runner` (the phases), :mod:`.stages` (per-stage breakdown), :mod:`.loopback` and
:mod:`.worker` (sockets, proxy, client process), :mod:`.report` and :mod:`.plots` (output).
"""

from __future__ import annotations

from .runner import BenchOptions, run_benchmark

__all__ = ["BenchOptions", "run_benchmark"]
