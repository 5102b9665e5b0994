"""``hybridkex kme``: serve the simulated ETSI GS QKD 014 KME pair (KME A and KME B) over mutual TLS.

Once both KMEs accept connections it prints, and flushes, one line per KME on stdout::

    KME-A https://127.0.0.1:PORT
    KME-B https://127.0.0.1:PORT

and, with ``--metrics``, ``KME-A-METRICS http://127.0.0.1:PORT/metrics`` and the same for KME B.
Then it serves until SIGINT or SIGTERM.  Logs (SAE IDs and key IDs, never keys) go to stderr.
With ``--link bb84`` the keys come from a simulated decoy-state BB84 link between the two KMEs
(its classical channel over a TCP socket on loopback); Status then carries the link's figures in
``status_extension`` and alarms (QBER aborts, MAC failures) are logged with the prefix ``ALARM``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from ..exceptions import ConfigurationError
from ..qkd.kme.listener import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS
from ..qkd.kme.pair import DEFAULT_CAPACITY_BITS, DEFAULT_RATE_BPS, KMEPairServer, KMEPairSettings, is_loopback
from ..qkd.kme.store import KMELimits
from ..qkd.pki import DemoPKI
from .linkopts import add_link_options, link_settings

HELP = "serve the simulated ETSI GS QKD 014 KME pair (two HTTPS endpoints sharing a simulated QKD link)"


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0..65535 (0 picks a free port)")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0 seconds")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pki", required=True, metavar="DIR",
                        help="demo PKI from 'hybridkex pki init DIR' (kme-a, kme-b certificates and ca.crt)")
    parser.add_argument("--port-a", type=_port, default=0, metavar="PORT", help="KME A's port (0: a free one)")
    parser.add_argument("--port-b", type=_port, default=0, metavar="PORT", help="KME B's port (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; keys must stay in the secure site)")
    parser.add_argument("--rate", type=_positive, default=DEFAULT_RATE_BPS, metavar="BITS_PER_S",
                        help="QKD link key rate in bits per second (default: %(default).0f)")
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY_BITS, metavar="BITS",
                        help="key material the link stores at most, in bits (default: %(default)s)")
    parser.add_argument("--initial", type=int, default=None, metavar="BITS",
                        help="key material stored at start (default: full)")
    parser.add_argument("--key-size", type=int, default=256, metavar="BITS", help="default key size (default: 256)")
    parser.add_argument("--max-keys-per-request", type=int, default=128, metavar="N",
                        help="max_key_per_request (default: 128)")
    parser.add_argument("--db", metavar="FILE",
                        help="SQLite file keeping undelivered keys across restarts, so that key IDs masters "
                             "pooled stay valid (default: memory only: a restart forgets them)")
    parser.add_argument("--delay-ms", type=_positive, default=0.0, metavar="MS",
                        help="delay added to every answer, to simulate a distant KME (default: 0)")
    parser.add_argument("--idle-timeout", type=_seconds, default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
                        help="close a connection that stays silent this long: TLS handshake, request headers or "
                             "body, or idle between requests (default: %(default)g)")
    parser.add_argument("--max-connections", type=_count, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help="connections each KME keeps open at once, TLS handshakes included; more are closed at "
                             "once (default: %(default)s)")
    parser.add_argument("--sae-a", action="append", metavar="SAE_ID",
                        help="SAE served by KME A (repeatable; default: sae-a)")
    parser.add_argument("--sae-b", action="append", metavar="SAE_ID",
                        help="SAE served by KME B (repeatable; default: sae-b)")
    g = parser.add_argument_group("metrics (Prometheus, plain HTTP)")
    g.add_argument("--metrics", action="store_true",
                   help="serve each KME's Prometheus metrics at /metrics on a plain-HTTP listener of its own (the "
                        "ETSI ports are mutual TLS for SAEs; a scraper is not one)")
    g.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address of the metrics listeners (default: %(default)s)")
    g.add_argument("--metrics-port-a", type=_port, default=0, metavar="PORT",
                   help="KME A's metrics port (0: a free one)")
    g.add_argument("--metrics-port-b", type=_port, default=0, metavar="PORT",
                   help="KME B's metrics port (0: a free one)")
    add_link_options(parser, default_speedup=1.0)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="log level on stderr (default: %(default)s)")


async def _serve(server: KMEPairServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print(f"KME-A {server.url_a}", flush=True)
        print(f"KME-B {server.url_b}", flush=True)
        if server.metrics_url_a:
            print(f"KME-A-METRICS {server.metrics_url_a}", flush=True)
            print(f"KME-B-METRICS {server.metrics_url_b}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = KMELimits(key_size=args.key_size, max_key_per_request=args.max_keys_per_request,
                       min_key_size=min(64, args.key_size), max_key_size=max(8192, args.key_size))
    if args.capacity < args.key_size:
        raise ConfigurationError("must hold at least one key (>= --key-size)", field="--capacity")
    link = link_settings(args)
    settings = KMEPairSettings(
        host=args.host, port_a=args.port_a, port_b=args.port_b, rate_bps=args.rate, capacity_bits=args.capacity,
        initial_bits=args.initial, limits=limits, db_path=Path(args.db) if args.db else None,
        delay=args.delay_ms / 1000.0, saes_a=tuple(args.sae_a or ("sae-a",)), saes_b=tuple(args.sae_b or ("sae-b",)),
        idle_timeout=args.idle_timeout, max_connections=args.max_connections, link=link,
        metrics=args.metrics, metrics_host=args.metrics_host, metrics_port_a=args.metrics_port_a,
        metrics_port_b=args.metrics_port_b,
    )
    for name, given in (("--metrics-host", args.metrics_host != "127.0.0.1"),
                        ("--metrics-port-a", args.metrics_port_a), ("--metrics-port-b", args.metrics_port_b)):
        if given and not args.metrics:
            raise ConfigurationError("needs --metrics", field=name)
    pki = DemoPKI.load(args.pki, required=("kme-a", "kme-b"))
    if args.metrics and not is_loopback(args.metrics_host):
        logging.getLogger("hybridkex.qkd.kme").warning(
            "metrics on %s, outside loopback: anyone who reaches it reads the link's figures", args.metrics_host)
    if not is_loopback(args.host):
        logging.getLogger("hybridkex.qkd.kme").warning(
            "listening on %s, outside loopback: QKD keys must not leave the operator's secure site", args.host)
    server = KMEPairServer(pki, settings)
    asyncio.run(_serve(server))
    return 0
