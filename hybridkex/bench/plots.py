"""PNG plots of a report (matplotlib, Agg backend; ``pip install 'hybridkex[bench]'``).

* ``latency.png``: the loopback latency distribution of each variant (box and whiskers over the
  individual handshakes, log scale), the stdlib certificate handshake marked;
* ``breakdown.png``: where a handshake's time goes, stacked per stage, next to the baselines;
* ``kme-latency.png``: pooled versus unpooled QKD keys as the KME latency grows, against hybridkex
  without QKD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..exceptions import ConfigurationError
from .stages import STAGES
from .variants import KME_DELAYS_MS

__all__ = ["check_plots_available", "write_plots"]

_COLORS = {"kem": "#4c72b0", "x25519": "#55a868", "combiner": "#8172b2", "auth": "#c44e52", "kme": "#dd8452",
           "tls": "#937860", "other": "#b0b0b0"}


def _pyplot() -> Any:
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - optional extra
    except ImportError:
        raise ConfigurationError("plots need matplotlib: pip install 'hybridkex[bench]'", field="plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    return plt


def check_plots_available() -> None:
    """Raise :class:`~hybridkex.exceptions.ConfigurationError` now if matplotlib is missing.

    For callers that measure for minutes before plotting: fail before, not after.
    """
    _pyplot()


def _mpl_at_least(major: int, minor: int) -> bool:
    import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - optional extra

    parts = matplotlib.__version__.split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return True


Drawing = Callable[[Any, Any, str], Any]


def save_figures(directory: str | Path, data: Any, subtitle: str,
                 drawings: Iterable[tuple[str, Drawing]]) -> list[Path]:
    """Draw each ``(file name, draw)`` as ``draw(plt, data, subtitle)`` (``None``: nothing to draw)
    and save it in ``directory`` (created if needed); returns the paths written."""
    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in drawings:
        fig = draw(plt, data, subtitle)
        if fig is None:
            continue
        path = out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def write_plots(report: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write the PNG files into ``directory`` (created if needed); returns their paths."""
    subtitle = (f"{report['machine']['cpu']}, {report['machine']['cores']} cores; Python "
                f"{report['versions']['python']}; {report['started']}")
    return save_figures(directory, report["variants"], subtitle,
                        (("latency.png", _latency), ("breakdown.png", _breakdown), ("kme-latency.png", _kme)))


def _latency(plt: Any, rows: list[dict[str, Any]], subtitle: str) -> Any:
    data = [(r["id"], r["latency_ms_samples"]) for r in rows if r.get("latency_ms_samples")]
    if not data:
        return None
    data.reverse()  # first variant at the top
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(data) + 1.8))
    # matplotlib >= 3.10 spells it orientation=, older releases vert=.
    horizontal = {"orientation": "horizontal"} if _mpl_at_least(3, 10) else {"vert": False}
    # Box and whiskers are NumPy percentiles (linear), the definition of stats.quantile behind the tables.
    ax.boxplot([d[1] for d in data], whis=(1, 99), showfliers=True, widths=0.6,
               flierprops={"markersize": 2, "alpha": 0.4}, **horizontal)
    ax.set_yticks(range(1, len(data) + 1), [d[0] for d in data], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("handshake latency over loopback, ms (log scale; box: quartiles, whiskers: p1-p99)")
    base = next((r["latency_ms_median"] for r in rows if r["id"] == "stdlib-cert"), None)
    if base:
        ax.axvline(base, color="#c44e52", linestyle="--", linewidth=1, label=f"stdlib-cert median {base:.2f} ms")
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.set_title(f"Handshake latency per variant\n{subtitle}", fontsize=9)
    return fig


def _breakdown(plt: Any, rows: list[dict[str, Any]], subtitle: str) -> Any:
    data = [r for r in rows if r.get("breakdown_ms") and r.get("kme_delay_ms", 0) == 0]
    if not data:
        return None
    data.reverse()
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(data) + 1.8))
    left = [0.0] * len(data)
    for stage in STAGES:
        widths = [float(r["breakdown_ms"].get(stage) or 0.0) for r in data]
        ax.barh(range(len(data)), widths, left=left, color=_COLORS[stage], label=stage, height=0.65)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(data)), [r["id"] for r in data], fontsize=8)
    ax.set_xlabel("ms per handshake, both ends in one thread over memory (baselines: the whole TLS handshake)")
    ax.legend(ncol=len(STAGES), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Where the handshake time goes (KME latency 0 ms)\n{subtitle}", fontsize=9)
    return fig


def _kme(plt: Any, rows: list[dict[str, Any]], subtitle: str) -> Any:
    by = {r["id"]: r for r in rows}
    key = "latency_ms_median" if any(r.get("latency_ms_median") for r in rows) else "wall_memory_ms_median"
    series = {
        "pooled keys": [by.get("hybridkex" if ms == 0 else f"hybridkex-kme{ms}ms-pool", {}).get(key)
                        for ms in KME_DELAYS_MS],
        "no pool": [by.get(f"hybridkex-kme{ms}ms-direct", {}).get(key) for ms in KME_DELAYS_MS],
    }
    if not any(v is not None for s in series.values() for v in s):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, values in series.items():
        pts = [(ms, v) for ms, v in zip(KME_DELAYS_MS, values, strict=True) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    none = by.get("hybridkex-no-qkd", {}).get(key)
    if none:
        ax.axhline(none, color="#55a868", linestyle="--", label=f"hybridkex without QKD ({none:.2f} ms)")
        ax.axhline(none * 1.05, color="#55a868", linestyle=":", linewidth=1, label="+5% goal")
    epoch = by.get("hybridkex-epoch-kme5ms", {}).get(key)
    if epoch:
        ax.plot([5], [epoch], marker="*", markersize=12, linestyle="none", label="epoch budget, 5 ms")
    ax.set_xlabel("simulated KME answer delay, ms")
    ax.set_ylabel("median handshake latency, ms" + (" (loopback)" if key.startswith("latency") else " (memory)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"QKD keys: pool versus direct KME requests\n{subtitle}", fontsize=9)
    return fig
