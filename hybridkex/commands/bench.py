"""``hybridkex bench``: handshake costs of hybridkex against today's TLS, measured in one run."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import Any

from ..exceptions import ConfigurationError

HELP = ("benchmark handshakes (default) or the tunnel's data path ('bench tunnel'): hybridkex against "
        "TLS 1.3 baselines, as ratios from one run")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", choices=("handshakes", "tunnel", "link"), default="handshakes",
                        help="handshakes (default); tunnel: the tunnel's data path against a direct connection "
                             "and stunnel (runs real tunnel processes and the simulated KME); link: handshakes per "
                             "second a simulated BB84 link carries vs its length, fresh and epoch key budgets")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every variant (under a minute)")
    parser.add_argument("--variants", metavar="IDS",
                        help="comma-separated variant ids or wildcards (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--suites", metavar="NAMES",
                        help="also measure the headline hybridkex handshake with each of these suites "
                             "(comma-separated; `hybridkex suites` lists them), as variants hybridkex-suite-NAME")
    parser.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    parser.add_argument("--plots", metavar="DIR", help="also write PNG plots (needs matplotlib)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown")
    parser.add_argument("--rounds", type=int, metavar="N", help="interleaved rounds in memory (default 7)")
    parser.add_argument("--n", type=int, metavar="N", help="most handshakes per variant and round (default 200)")
    parser.add_argument("--warmup", type=int, metavar="N", help="warm-up handshakes per variant (default 20)")
    parser.add_argument("--samples", type=int, metavar="N",
                        help="loopback latency samples per variant (default 200, fewer for slow variants)")
    parser.add_argument("--clients", type=int, metavar="N",
                        help="concurrent clients for the throughput measurement, 0 to skip (default 8)")
    parser.add_argument("--seconds", type=float, metavar="S", help="duration of each throughput run (default 1.5)")
    parser.add_argument("--proxy-rtt", type=float, metavar="MS", default=0.0,
                        help="also measure latency through a proxy adding this round-trip time")
    parser.add_argument("--no-loopback", action="store_true", help="in-memory measurements only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--loads", metavar="IDS", help="tunnel: comma-separated loads (small, pipelined, bulk)")
    parser.add_argument("--no-stunnel", action="store_true", help="tunnel: skip the stunnel baseline")
    parser.add_argument("--distances", metavar="KM,KM", help="link: fibre lengths (default 5,25,50,75,100)")
    parser.add_argument("--pulses", type=float, metavar="N",
                        help="link: pulses per block (default: 1e6 detections' worth)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="tunnel: also a pair with N worker processes on each end, side by side (adds the "
                             "'connect' load)")
    parser.add_argument("--client-workers", type=int, metavar="N",
                        help="tunnel: the client's worker processes in that pair (default: as many as --workers)")


def _positive(value: float | None, name: str, minimum: float) -> None:
    if value is not None and value < minimum:
        raise ConfigurationError(f"must be >= {minimum:g}, got {value:g}", field=name)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options in a fixed order)."""
    parts = ["hybridkex", "bench"]
    for flag in ("quick", "no_loopback"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    for name in ("variants", "suites", "rounds", "n", "warmup", "samples", "clients", "seconds", "proxy_rtt", "json",
                 "plots", "markdown"):
        value = getattr(args, name)
        if value is not None and not (name == "proxy_rtt" and not value):
            parts += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join(parts)


def _run_tunnel(args: argparse.Namespace) -> int:
    from ..bench.tunnelload import LOADS  # noqa: PLC0415
    from ..bench.tunnelreport import format_tunnel_markdown, format_tunnel_report  # noqa: PLC0415
    from ..bench.tunnelrun import TunnelBenchOptions, run_tunnel_benchmark  # noqa: PLC0415

    for name in ("variants", "suites", "n", "warmup", "samples", "clients"):
        if getattr(args, name) is not None:
            raise ConfigurationError("applies to the handshake benchmark, not 'bench tunnel'",
                                     field="--" + name.replace("_", "-"))
    _positive(args.rounds, "--rounds", 1)
    _positive(args.seconds, "--seconds", 0.1)
    opts = TunnelBenchOptions.quick() if args.quick else TunnelBenchOptions()
    if args.loads:
        known = {load.id for load in LOADS}
        wanted = tuple(x.strip() for x in args.loads.split(","))
        unknown = [x for x in wanted if x not in known]
        if unknown:
            raise ConfigurationError(f"unknown load {unknown[0]!r}; choose from {', '.join(sorted(known))}",
                                     field="--loads")
        opts.loads = wanted
    if args.workers is not None:
        _positive(args.workers, "--workers", 1)
        opts.workers = args.workers
        if not args.loads and args.workers > 1:
            opts.loads = tuple(load.id for load in LOADS)  # handshakes/s too: the goal is on both
    if args.client_workers is not None:
        if args.workers is None or args.workers < 2:
            raise ConfigurationError("needs --workers N (N >= 2): it sets the client of that pair",
                                     field="--client-workers")
        _positive(args.client_workers, "--client-workers", 1)
        opts.client_workers = args.client_workers
    if args.rounds is not None:
        opts.rounds = args.rounds
    if args.seconds is not None:
        opts.seconds = args.seconds
    opts.stunnel = not args.no_stunnel
    if args.plots:
        from ..bench.plots import check_plots_available  # noqa: PLC0415

        check_plots_available()  # before minutes of measuring, not after
    parts = ["hybridkex", "bench", "tunnel"] + (["--quick"] if args.quick else [])
    parts += ["--no-stunnel"] if args.no_stunnel else []
    for name in ("loads", "workers", "client_workers", "rounds", "seconds", "json", "plots", "markdown"):
        if getattr(args, name) is not None:
            parts += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    report = run_tunnel_benchmark(opts, progress=not args.no_progress, command=shlex.join(parts))
    print(format_tunnel_report(report))
    _write_outputs(args, report, format_tunnel_markdown)
    if args.plots:
        from ..bench.tunnelplots import write_tunnel_plots  # noqa: PLC0415

        for path in write_tunnel_plots(report, args.plots):
            print(f"plot: {path}")
    return 0


def _write_outputs(args: argparse.Namespace, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """--json and --markdown, the same for both benchmarks."""
    from ..bench.report import write_json  # noqa: PLC0415

    if args.json:
        write_json(report, args.json)
        print(f"\nJSON: {args.json}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(report))
        print(f"Markdown: {args.markdown}")
def _suites(raw: str | None) -> tuple[str, ...]:
    """The --suites names, each known and runnable here (its KEM loads and fits the wire format)."""
    from ..protocol import suite_kem  # noqa: PLC0415
    from ..suites import SUITES, get_suite, unknown_suite  # noqa: PLC0415

    names = tuple(n.strip() for n in (raw or "").split(",") if n.strip())
    if len(set(names)) != len(names):
        raise ConfigurationError("a suite is listed twice", field="--suites")
    for name in names:
        if name not in SUITES:
            raise ConfigurationError(unknown_suite(name), field="--suites")
        try:
            suite_kem(get_suite(name))
        except ConfigurationError as exc:  # e.g. a key too large for the wire format
            raise ConfigurationError(str(exc).removeprefix(f"{exc.field}: "), field="--suites") from None
    return names


def _run_link(args: argparse.Namespace) -> int:
    from ..bench.linkcap import (  # noqa: PLC0415
        LinkBenchOptions,
        format_link_markdown,
        format_link_report,
        run_link_benchmark,
        write_link_plot,
    )

    for name in ("variants", "suites", "n", "warmup", "samples", "clients", "loads", "seconds"):
        if getattr(args, name) is not None:
            raise ConfigurationError("does not apply to 'bench link'", field="--" + name.replace("_", "-"))
    opts = LinkBenchOptions.quick() if args.quick else LinkBenchOptions()
    if args.distances:
        try:
            opts.distances_km = tuple(float(x) for x in args.distances.split(","))
        except ValueError:
            raise ConfigurationError(f"{args.distances!r}: expected comma-separated kilometres, e.g. 10,50,100",
                                     field="--distances") from None
        if any(not 0 <= d <= 300 for d in opts.distances_km):
            raise ConfigurationError("each distance must be 0..300 km", field="--distances")
    if args.pulses is not None:
        if not 1e5 <= args.pulses <= 1e9:
            raise ConfigurationError("must be between 1e5 and 1e9", field="--pulses")
        opts.pulses = int(args.pulses)
    if args.rounds is not None:
        _positive(args.rounds, "--rounds", 1)
        opts.blocks = args.rounds
    if args.plots:
        from ..bench.plots import check_plots_available  # noqa: PLC0415

        check_plots_available()
    parts = ["hybridkex", "bench", "link"] + (["--quick"] if args.quick else [])
    for name in ("distances", "pulses", "rounds"):
        if getattr(args, name) is not None:
            parts += ["--" + name, str(getattr(args, name))]
    report = run_link_benchmark(opts, command=shlex.join(parts))
    print(format_link_report(report))
    _write_outputs(args, report, format_link_markdown)
    if args.plots:
        print(f"Plot: {write_link_plot(report, args.plots)}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.what == "tunnel":
        return _run_tunnel(args)
    if args.what == "link":
        if args.workers is not None or args.client_workers is not None:
            raise ConfigurationError("applies to 'bench tunnel' only",
                                     field="--workers" if args.workers is not None else "--client-workers")
        return _run_link(args)
    if args.distances or args.pulses is not None:
        raise ConfigurationError("applies to 'bench link' only", field="--distances" if args.distances else "--pulses")
    if args.loads or args.no_stunnel or args.workers is not None or args.client_workers is not None:
        raise ConfigurationError("applies to 'bench tunnel' only",
                                 field="--loads" if args.loads else "--no-stunnel" if args.no_stunnel
                                 else "--workers" if args.workers is not None else "--client-workers")
    # Imported here, not at the top: `hybridkex --help` must not load the benchmark's dependencies.
    from ..bench import BenchOptions, run_benchmark  # noqa: PLC0415
    from ..bench.report import format_markdown, format_report  # noqa: PLC0415
    from ..bench.variants import VARIANTS, select  # noqa: PLC0415

    if args.list:
        for v in VARIANTS:
            print(f"{v.id:33} ({v.item}) {v.label}")
        return 0
    for name, minimum in (("rounds", 1), ("n", 1), ("warmup", 0), ("samples", 5), ("clients", 0),
                          ("seconds", 0.1), ("proxy_rtt", 0)):
        _positive(getattr(args, name), f"--{name.replace('_', '-')}", minimum)
    patterns = tuple(args.variants.split(",")) if args.variants else None
    suites = _suites(args.suites)
    select(patterns, suites)  # unknown ids fail here, before anything starts
    if args.plots:
        from ..bench.plots import check_plots_available  # noqa: PLC0415

        check_plots_available()
    opts = BenchOptions.quick() if args.quick else BenchOptions()
    opts.variants = patterns
    opts.suites = suites
    for field, value in (("rounds", args.rounds), ("n", args.n), ("warmup", args.warmup), ("samples", args.samples),
                         ("clients", args.clients), ("throughput_seconds", args.seconds)):
        if value is not None:
            setattr(opts, field, value)
    opts.proxy_rtt_ms = args.proxy_rtt
    opts.loopback = not args.no_loopback
    report = run_benchmark(opts, progress=not args.no_progress, command=_command(args))
    print(format_report(report))
    _write_outputs(args, report, format_markdown)
    if args.plots:
        from ..bench.plots import write_plots  # noqa: PLC0415

        for path in write_plots(report, args.plots):
            print(f"plot: {path}")
    return 0
