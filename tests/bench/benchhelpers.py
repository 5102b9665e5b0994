"""Shared bits of the benchmark tests (imported by name; never `from conftest import`)."""

from __future__ import annotations

#: Fields every variant object in the JSON must carry (the issue's contract).
REQUIRED_FIELDS = ("id", "cpu_ms_median", "latency_ms_median", "latency_ms_p99", "bytes_on_wire", "round_trips")

#: Ids the JSON must contain (issue: a, c, d, e).
REQUIRED_IDS = ("stdlib-cert", "pyopenssl-cert-x25519mlkem768", "tls-psk", "hybridkex")

#: The tiny run: the required ids plus the variants the goals need, with the smallest sizes that
#: still exercise every phase (memory, breakdown, loopback latency, counting proxy, throughput,
#: delaying proxy).  Numbers from it mean nothing; only the shape of the output is checked.
TINY_VARIANTS = ",".join((*REQUIRED_IDS, "hybridkex-no-qkd", "hybridkex-kme5ms-pool", "hybridkex-epoch-kme5ms",
                          "hybridkex-memory-qkd", "hybridkex-reconnect"))
TINY_ARGS = ("--quick", "--variants", TINY_VARIANTS, "--rounds", "2", "--n", "3", "--warmup", "1",
             "--samples", "10", "--clients", "2", "--seconds", "0.2", "--proxy-rtt", "4")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
