"""The human-readable report (terminal table) and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .stages import STAGES

__all__ = ["format_markdown", "format_report", "write_json"]


def _f(x: Any, fmt: str = "8.3f", width: int = 8) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(width)
    return format(x, fmt).rjust(width)


def format_report(report: dict[str, Any]) -> str:
    """The whole report as text: set-up, the variants table, the goals, the stage breakdown."""
    m, v, o = report["machine"], report["versions"], report["options"]
    rows = report["variants"]
    lines = [
        "hybridkex handshake benchmark" + (" (quick mode: smoke numbers only)" if o.get("quick_mode") else ""),
        f"  command:  {report['command']}",
        f"  machine:  {m['cpu']}, {m['cores']} cores, {m['platform']}; load average {m.get('loadavg_start')} -> "
        f"{m.get('loadavg_end')}",
        f"  software: Python {v['python']}, hybridkex {v['hybridkex']}, cryptography {v['cryptography']}, "
        f"pyOpenSSL {v['pyOpenSSL']} ({v.get('pyopenssl_openssl', '?')}), stdlib ssl {v['stdlib_openssl']}, "
        f"aiohttp {v['aiohttp']}",
        f"  in memory: warm-up {o['warmup']}, {o['rounds']} interleaved rounds of up to {o['n']} handshakes "
        f"({o['round_seconds']:g} s budget per variant and round); medians over rounds",
        f"  loopback: up to {o['samples']} sequential handshakes per variant in {o['latency_rounds']} rounds; "
        + (f"throughput with {o['clients']} concurrent clients for {o['throughput_seconds']:g} s" if o["clients"]
           else "no throughput run")
        + (f"; proxy adds {o['proxy_rtt_ms']:g} ms RTT" if o["proxy_rtt_ms"] else ""),
        f"  noise: per-round CPU spread (max-min)/median: median {_pct(report['noise_cpu_median'])}, "
        f"worst {_pct(report['noise_cpu_max'])}",
        f"  run took {report['duration_s']:g} s",
        "",
    ]
    base = next((r["cpu_ms_median"] for r in rows if r["id"] == "stdlib-cert"), None)
    proxy = bool(o["proxy_rtt_ms"])
    head = (f"{'variant':33} {'CPU ms':>7} {'xstdlib':>7} {'noise':>6} {'mem ms':>7} {'lat ms':>7} {'p95':>7} "
            f"{'p99':>7} {'hs/s':>6} {'bytes':>6} {'RTs':>3}" + (f" {'proxy ms':>8}" if proxy else ""))
    lines += [head, "-" * len(head)]
    for r in rows:
        cpu = r["cpu_ms_median"]
        ratio = cpu / base if cpu and base else None
        lines.append(
            f"{r['id']:33} {_f(cpu, '7.3f', 7)} {_f(ratio, '6.2f', 6)}x {_pct(r['cpu_noise']):>6} "
            f"{_f(r['wall_memory_ms_median'], '7.2f', 7)} {_f(r['latency_ms_median'], '7.2f', 7)} "
            f"{_f(r['latency_ms_p95'], '7.2f', 7)} {_f(r['latency_ms_p99'], '7.2f', 7)} "
            f"{_f(r['handshakes_per_s'], '6.0f', 6)} {r['bytes_on_wire']:6d} {r['round_trips']:3d}"
            + (f" {_f(r['proxy_latency_ms_median'], '8.2f', 8)}" if proxy else "")
        )
    lines += [
        "",
        "CPU ms: both ends in one thread over memory (no network); xstdlib: ratio to stdlib-cert in this run;",
        "mem ms: wall time of the same in-memory handshake (includes waiting for a KME); lat: loopback, client "
        "side;",
        "hs/s: concurrent clients; bytes: on the wire per handshake (both directions, counted); RTs: round trips "
        "the client waits for.",
        "",
        "Goals (ratios from this run):",
    ]
    for g in report["goals"]:
        verdict = "n/a (variants not selected)" if g["met"] is None else ("met" if g["met"] else "MISSED")
        lines.append(f"  {_f(g['ratio'], '6.3f', 6)}x (limit {g['limit']:g}x) {verdict:8}  {g['text']}")
    lines += _breakdown(rows)
    notes = [(r["id"], n) for r in rows for n in r["notes"]]
    if notes:
        lines += ["", "Notes:"] + [f"  {vid}: {n}" for vid, n in notes]
    mismatched = [r["id"] for r in rows if r.get("loopback_wire") and _wire_differs(r)]
    if mismatched:
        lines.append("  bytes/round trips on loopback differ from memory for: " + ", ".join(mismatched)
                     + " (see loopback_wire in the JSON)")
    return "\n".join(lines)


def _wire_differs(row: dict[str, Any]) -> bool:
    """Loopback and memory counts disagree (beyond the few bytes by which ECDSA signatures vary)."""
    lw = row["loopback_wire"]
    return bool(lw["round_trips"] != row["round_trips"] or abs(lw["bytes_on_wire"] - row["bytes_on_wire"]) > 8)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def _breakdown(rows: list[dict[str, Any]]) -> list[str]:
    hyb = [r for r in rows if r["kind"] == "hybridkex" and r.get("breakdown_ms")]
    if not hyb:
        return []
    head = f"{'stage breakdown, ms per handshake':33} " + " ".join(f"{s:>8}" for s in STAGES) + f" {'total':>8}"
    out = ["", head, "-" * len(head)]
    for r in hyb:
        b = r["breakdown_ms"]
        out.append(f"{r['id']:33} " + " ".join(_f(b.get(s), "8.3f") for s in STAGES)
                   + f" {_f(sum(b.values()), '8.3f')}")
    out.append("(wall time in one thread with the stage functions wrapped; kme includes waiting for the KME)")
    return out


def format_markdown(report: dict[str, Any]) -> str:
    """The results, goals and stage breakdown as Markdown tables (for docs/benchmarks.md)."""
    rows = report["variants"]
    base = next((r["cpu_ms_median"] for r in rows if r["id"] == "stdlib-cert"), None)
    m = report["machine"]
    out = [f"`{report['command']}`: {m['cpu']}, {m['cores']} cores, load {m.get('loadavg_start')} -> "
           f"{m.get('loadavg_end')}, {report['duration_s']:g} s, CPU noise median "
           f"{_pct(report['noise_cpu_median'])} (worst {_pct(report['noise_cpu_max'])})", "",
           "| variant | CPU ms | x stdlib | mem ms | loopback median / p95 / p99 ms | hs/s | bytes | RTs |",
           "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        cpu = r["cpu_ms_median"]
        lat = ("(memory only)" if r["latency_ms_median"] is None else
               f"{r['latency_ms_median']:.2f} / {r['latency_ms_p95']:.2f} / {r['latency_ms_p99']:.2f}")
        out.append(f"| {r['id']} | {_f(cpu, '.3f', 0)} | {_f(cpu / base if cpu and base else None, '.2f', 0)} | "
                   f"{_f(r['wall_memory_ms_median'], '.2f', 0)} | {lat} | {_f(r['handshakes_per_s'], '.0f', 0)} | "
                   f"{r['bytes_on_wire']} | {r['round_trips']} |")
    out += ["", "| goal | ratio | verdict |", "|---|---:|---|"]
    for g in report["goals"]:
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "missed")
        out.append(f"| {g['text']} | {_f(g['ratio'], '.2f', 0)}x | {verdict} |")
    hyb = [r for r in rows if r["kind"] == "hybridkex" and r.get("breakdown_ms")]
    if hyb:
        out += ["", "| variant | " + " | ".join(STAGES) + " | total |", "|---|" + "---:|" * (len(STAGES) + 1)]
        for r in hyb:
            b = r["breakdown_ms"]
            out.append(f"| {r['id']} | " + " | ".join(_f(b.get(st), ".3f", 0) for st in STAGES)
                       + f" | {sum(b.values()):.2f} |")
    return "\n".join(out) + "\n"


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as JSON (NaN becomes null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    Path(path).write_text(json.dumps(clean(report), indent=2) + "\n", encoding="utf-8")
