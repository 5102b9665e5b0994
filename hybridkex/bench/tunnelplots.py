"""PNG plots of a data-path report (``hybridkex bench tunnel --plots DIR``; matplotlib, as
:mod:`hybridkex.bench.plots`).

* ``tunnel-rate.png``: requests per second per load, one bar per relay (direct, stunnel, hybridkex,
  ...), the spread over rounds as an error bar and hybridkex's ratio to stunnel written above it;
* ``tunnel-latency.png``: p50 / p95 / p99 latency per load and relay (log scale).

One panel per load: the loads' rates differ by an order of magnitude, so a shared axis would
flatten the small ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plots import save_figures

__all__ = ["write_tunnel_plots"]

_RELAY_COLORS = {"direct": "#b0b0b0", "stunnel": "#dd8452", "hybridkex": "#4c72b0", "hybridkex-asyncio": "#8172b2"}
_PCT_ALPHA = {"latency_ms_p50": 1.0, "latency_ms_p95": 0.6, "latency_ms_p99": 0.3}


def write_tunnel_plots(report: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write the PNG files into ``directory`` (created if needed); returns their paths."""
    m, v = report["machine"], report["versions"]
    subtitle = (f"{m['cpu']}, {m['cores']} cores; Python {v['python']}; load average "
                f"{m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    return save_figures(directory, report, subtitle, (("tunnel-rate.png", _rate), ("tunnel-latency.png", _latency)))


def _panels(plt: Any, report: dict[str, Any]) -> tuple[Any, list[Any]]:
    n = max(len(report["loads"]), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.4), squeeze=False, layout="constrained")
    return fig, list(axes[0])


def _color(relay_id: str) -> str:
    return _RELAY_COLORS.get(relay_id, "#55a868")


def _rate(plt: Any, report: dict[str, Any], subtitle: str) -> Any:
    relays = [r["id"] for r in report["relays"]]
    if not any(report["results"][r][load["id"]]["rate_median"] for r in relays for load in report["loads"]):
        return None
    fig, axes = _panels(plt, report)
    for ax, load in zip(axes, report["loads"], strict=False):
        cells = [report["results"][r][load["id"]] for r in relays]
        heights = [c["rate_median"] or 0.0 for c in cells]
        # Error bars: the lowest and highest round, so the noise is visible next to the median.
        low = [h - min(c["rate_rounds"]) if c["rate_rounds"] else 0.0 for h, c in zip(heights, cells, strict=True)]
        high = [max(c["rate_rounds"]) - h if c["rate_rounds"] else 0.0 for h, c in zip(heights, cells, strict=True)]
        xs = range(len(relays))
        ax.bar(xs, heights, color=[_color(r) for r in relays], yerr=[low, high], capsize=3)
        ax.set_xticks(list(xs), relays, rotation=30, ha="right", fontsize=8)
        ax.set_title(load["id"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ratio = report.get("vs_stunnel", {}).get(load["id"], {}).get("rate_vs_stunnel")
        if ratio is not None and "hybridkex" in relays:
            i = relays.index("hybridkex")
            ax.annotate(f"{ratio:.2f}x stunnel", (i, heights[i] + high[i]),  # above its error bar
                        textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
    axes[0].set_ylabel("requests per second (median over rounds; bars: min-max)")
    fig.suptitle(f"Tunnel data path: request rate per load\n{subtitle}", fontsize=9)
    return fig


def _latency(plt: Any, report: dict[str, Any], subtitle: str) -> Any:
    relays = [r["id"] for r in report["relays"]]
    if not any(report["results"][r][load["id"]]["latency_ms_p50"] for r in relays for load in report["loads"]):
        return None
    fig, axes = _panels(plt, report)
    width = 0.8 / len(_PCT_ALPHA)
    for ax, load in zip(axes, report["loads"], strict=False):
        for k, (key, alpha) in enumerate(_PCT_ALPHA.items()):
            values = [report["results"][r][load["id"]][key] or 0.0 for r in relays]
            ax.bar([i + (k - 1) * width for i in range(len(relays))], values, width=width,
                   color=[_color(r) for r in relays], alpha=alpha, label=key.rsplit("_", 1)[1])
        ax.set_xticks(list(range(len(relays))), relays, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "25" else ""))
        ax.set_title(load["id"], fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("latency per request batch, ms (log scale)")
    axes[-1].legend(fontsize=7, title="percentile (shade)", title_fontsize=7)
    fig.suptitle(f"Tunnel data path: latency percentiles per load\n{subtitle}", fontsize=9)
    return fig
