"""The data-path benchmark's report: a terminal table and Markdown (the JSON is
:func:`hybridkex.bench.report.write_json`)."""

from __future__ import annotations

from typing import Any

from .report import _f

__all__ = ["format_tunnel_markdown", "format_tunnel_report"]


def _verdict(entry: dict[str, Any], key: str) -> str:
    if key not in entry:
        return "n/a"
    return "met" if entry[key] else "MISSED"


def _header(report: dict[str, Any]) -> list[str]:
    m, v, o = report["machine"], report["versions"], report["options"]
    stunnel = v.get("stunnel") or "not measured"
    if v.get("stunnel_tls"):
        stunnel += f" ({v['stunnel_tls']})"
    return [
        f"  command:  {report['command']}",
        f"  machine:  {m['cpu']}, {m['cores']} cores, {m['platform']}; load average {m.get('loadavg_start')} -> "
        f"{m.get('loadavg_end')}",
        f"  software: Python {v['python']}, hybridkex {v['hybridkex']}, pyOpenSSL {v['pyOpenSSL']} "
        f"({v.get('pyopenssl_openssl', '?')}); stunnel: {stunnel}",
        f"  kTLS:     {m['ktls']['summary'] if m.get('ktls') else 'not reported'}",
        f"  {o['rounds']} rounds of {o['seconds']:g} s per relay and load (order rotating); run took "
        f"{report['duration_s']:g} s",
    ]


def format_tunnel_report(report: dict[str, Any]) -> str:
    """The whole report as text: set-up, one table per load, the goals against stunnel."""
    quick = " (quick mode: smoke numbers only)" if report["options"].get("quick_mode") else ""
    lines = ["hybridkex tunnel data-path benchmark" + quick, *_header(report), ""]
    head = (f"{'load':10} {'relay':17} {'req/s':>9} {'noise':>6} {'MB/s':>8} {'p50 ms':>7} {'p95':>7} {'p99':>7} "
            f"{'CPU ms/MB':>9} {'cores':>5}")
    lines += [head, "-" * len(head)]
    for load in report["loads"]:
        for relay in report["relays"]:
            r = report["results"][relay["id"]][load["id"]]
            if r["errors"] and not r["rate_median"]:
                lines.append(f"{load['id']:10} {relay['id']:17} failed: {r['error']}")
                continue
            lines.append(
                f"{load['id']:10} {relay['id']:17} {_f(r['rate_median'], '9.0f', 9)} "
                f"{_f(r['rate_noise'] * 100, '5.0f', 5)}% {_f(r['mb_per_s_median'], '8.2f', 8)} "
                f"{_f(r['latency_ms_p50'], '7.3f', 7)} {_f(r['latency_ms_p95'], '7.3f', 7)} "
                f"{_f(r['latency_ms_p99'], '7.3f', 7)} {_f(r['cpu_ms_per_mb_median'], '9.2f', 9)} "
                f"{_f(r.get('cores_median'), '5.2f', 5)}")
    lines += ["", "Method:"] + [f"  {k}: {v}" for k, v in report.get("method", {}).items()] + [""]
    vs = report["vs_stunnel"]
    if any(vs.values()):
        lines.append("Goals against stunnel (issue 15; ratios from this run):")
        for load_id, e in vs.items():
            lines.append(
                f"  {load_id:10} rate {_f(e.get('rate_vs_stunnel'), '5.2f', 5)}x (>= 1.0: {_verdict(e, 'goal_rate')}); "
                f"added p50 {_f(e.get('added_p50_ms'), '6.3f', 6)} ms vs stunnel's "
                f"{_f(e.get('stunnel_added_p50_ms'), '6.3f', 6)} ({_verdict(e, 'goal_latency')}); "
                f"CPU/MB {_f(e.get('cpu_per_mb_vs_stunnel'), '5.2f', 5)}x (<= 1.5: {_verdict(e, 'goal_cpu')})")
    for load_id, e in report.get("vs_one_worker", {}).items():
        if load_id == next(iter(report["vs_one_worker"])):
            lines.append(f"Server --workers {e['workers']}, client --workers {e.get('client_workers', 1)} against "
                         "one process per end (issue 16; >= 1.6x) and against stunnel (>= 1.0):")
        lines.append(f"  {load_id:10} rate {e['rate_vs_one_worker']:5.2f}x ({_verdict(e, 'goal_rate')}); "
                     f"vs stunnel {_f(e.get('rate_vs_stunnel'), '5.2f', 5)}x ({_verdict(e, 'goal_rate_vs_stunnel')})")
    if report["notes"]:
        lines += ["", "Notes:"] + [f"  {n}" for n in report["notes"]]
    return "\n".join(lines)


def format_tunnel_markdown(report: dict[str, Any]) -> str:
    """The results and the goals as Markdown tables (for docs/benchmarks.md)."""
    out = [line.strip() for line in _header(report)]
    out = ["- " + line for line in out] + ["",
           "| load | relay | req/s | MB/s | p50 / p95 / p99 ms | CPU ms/MB | cores |",
           "|---|---|---:|---:|---|---:|---:|"]
    for load in report["loads"]:
        for relay in report["relays"]:
            r = report["results"][relay["id"]][load["id"]]
            lat = (f"{_f(r['latency_ms_p50'], '.3f', 0)} / {_f(r['latency_ms_p95'], '.3f', 0)} / "
                   f"{_f(r['latency_ms_p99'], '.3f', 0)}")
            out.append(f"| {load['id']} | {relay['id']} | {_f(r['rate_median'], '.0f', 0)} | "
                       f"{_f(r['mb_per_s_median'], '.2f', 0)} | {lat} | {_f(r['cpu_ms_per_mb_median'], '.2f', 0)} | "
                       f"{_f(r.get('cores_median'), '.2f', 0)} |")
    vs = report["vs_stunnel"]
    if any(vs.values()):
        out += ["", "| load | rate vs stunnel | added p50 ms (stunnel's) | CPU/MB vs stunnel |", "|---|---:|---:|---:|"]
        for load_id, e in vs.items():
            out.append(f"| {load_id} | {_f(e.get('rate_vs_stunnel'), '.2f', 0)}x ({_verdict(e, 'goal_rate')}) | "
                       f"{_f(e.get('added_p50_ms'), '.3f', 0)} ({_f(e.get('stunnel_added_p50_ms'), '.3f', 0)}; "
                       f"{_verdict(e, 'goal_latency')}) | {_f(e.get('cpu_per_mb_vs_stunnel'), '.2f', 0)}x "
                       f"({_verdict(e, 'goal_cpu')}) |")
    workers = report.get("vs_one_worker", {})
    if workers:
        out += ["", "| load | --workers N (server, client) vs one process per end (>= 1.6x) "
                    "| same vs stunnel (>= 1.0x) |",
                "|---|---:|---:|"]
        out += [f"| {load_id} | {e['rate_vs_one_worker']:.2f}x, N = {e['workers']}, {e.get('client_workers', 1)} "
                f"({_verdict(e, 'goal_rate')}) | {_f(e.get('rate_vs_stunnel'), '.2f', 0)}x "
                f"({_verdict(e, 'goal_rate_vs_stunnel')}) |"
                for load_id, e in workers.items()]
    if report.get("method"):
        out += ["", "Method:", ""] + [f"- {k}: {v}" for k, v in report["method"].items()]
    if report["notes"]:
        out += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"
