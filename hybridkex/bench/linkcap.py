"""``hybridkex bench link``: how many handshakes per second a QKD link carries, against its length.

For each distance the GYS decoy-state BB84 link (:mod:`hybridkex.qkdlink`) is run for real: blocks
of ``pulses`` simulated pulses go through the whole post-processing (sifting, estimation, Cascade,
verification, privacy amplification, Wegman-Carter authentication) in memory, and the key they
give, less the 896 bits of authentication key each block consumes, is divided by the block's
fibre time at the real 2 MHz pulse rate.  The asymptotic rate (infinite blocks, vacuum + weak
decoy) is the ceiling.  Capacity = key rate / bits per connection:

* ``fresh``: every handshake takes a new QKD key (``suite.qkd_key_bits``, 256 bits);
* ``epoch``: a key serves up to ``epoch_max_handshakes`` handshakes (1000 by default), so a
  connection costs 256/1000 bits; the link must also renew each peer pair's key every
  ``epoch_max_age`` seconds, so it serves at most ``rate * max_age / 256`` peer pairs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..policy import KeyBudget
from ..qkdlink import events, model, protocol
from ..qkdlink import postprocess as pp
from ..qkdlink.auth import ChannelAuthenticator, KeyPool
from ..qkdlink.session import BLOCK_AUTH_BYTES
from ..suites import DEFAULT_SUITE

__all__ = ["LinkBenchOptions", "format_link_markdown", "format_link_report", "run_link_benchmark",
           "write_link_plot"]


@dataclass
class LinkBenchOptions:
    """A block is ``clicks`` detections (a real link accumulates a block the same way), so longer links
    get proportionally more pulses; ``pulses`` fixes the pulse count instead."""

    distances_km: tuple[float, ...] = (5.0, 25.0, 50.0, 75.0, 100.0)
    clicks: int = 10**6
    pulses: int | None = None
    blocks: int = 2
    seed: int = 1

    @classmethod
    def quick(cls) -> LinkBenchOptions:
        return cls(distances_km=(5.0, 25.0, 50.0, 100.0), clicks=2 * 10**5, blocks=1)

    def pulses_for(self, link: model.LinkParameters) -> int:
        if self.pulses is not None:
            return self.pulses
        gain = sum(p * model.expected_gain(link, m) for p, m in
                   ((link.p_signal, link.mu), (link.p_decoy, link.nu), (link.p_vacuum, 0.0)))
        return math.ceil(self.clicks / gain)


def _blocks(link: model.LinkParameters, opts: LinkBenchOptions, seed: int) -> dict[str, Any]:
    config = pp.PostProcessConfig.calibrated(link)
    pulses = opts.pulses_for(link)
    final, ok, qbers, cpu = 0, 0, [], 0.0
    for i in range(opts.blocks):
        rng = np.random.default_rng([seed, i])
        t0 = time.perf_counter()
        block = events.simulate_block(link, pulses, rng)
        pad = bytes(rng.integers(0, 256, BLOCK_AUTH_BYTES, dtype=np.uint8))
        alice = protocol.AliceEnd(block.alice, block.sent, link, config,
                                  ChannelAuthenticator(KeyPool(pad), initiator=False), rng=rng, auth_reserve_bits=0)
        bob = protocol.BobEnd(block.bob, link, config, ChannelAuthenticator(KeyPool(pad), initiator=True),
                              auth_reserve_bits=0)
        protocol.run_in_memory(alice, bob)
        cpu += time.perf_counter() - t0
        if alice.result is not None and bob.result is not None:
            ok += 1
            final += alice.result.final_bits
            qbers.append(alice.result.qber)
    fibre_s = opts.blocks * pulses / link.pulse_rate_hz
    net = max(0, final - opts.blocks * 8 * BLOCK_AUTH_BYTES)
    return {"blocks_ok": ok, "final_bits": final, "finite_rate_bps": final / fibre_s, "net_rate_bps": net / fibre_s,
            "qber": float(np.mean(qbers)) if qbers else None, "cpu_s_per_block": cpu / opts.blocks,
            "pulses_per_block": pulses, "fibre_s_per_block": pulses / link.pulse_rate_hz}


def run_link_benchmark(opts: LinkBenchOptions, *, command: str = "") -> dict[str, Any]:
    budget = KeyBudget(mode="epoch")
    assert budget.epoch_max_handshakes is not None and budget.epoch_max_age is not None
    fresh_bits = DEFAULT_SUITE.qkd_key_bits
    epoch_bits = fresh_bits / budget.epoch_max_handshakes
    rows = []
    for d in opts.distances_km:
        link = model.GYS.at(d)
        asym = model.key_rate_vacuum_weak(link) * link.pulse_rate_hz
        m = _blocks(link, opts, opts.seed)
        rows.append({
            "distance_km": d, "asymptotic_rate_bps": asym, **m,
            "fresh_conn_per_s": m["net_rate_bps"] / fresh_bits, "epoch_conn_per_s": m["net_rate_bps"] / epoch_bits,
            "fresh_conn_per_s_asymptotic": asym / fresh_bits, "epoch_conn_per_s_asymptotic": asym / epoch_bits,
            "epoch_peer_pairs": m["net_rate_bps"] * budget.epoch_max_age / fresh_bits,
        })
    return {"kind": "link", "command": command, "link": "GYS decoy-state BB84 (vacuum + weak decoy)",
            "pulse_rate_hz": model.GYS.pulse_rate_hz, "clicks_per_block": opts.clicks if opts.pulses is None else None,
            "pulses_per_block": opts.pulses, "blocks": opts.blocks,
            "auth_bits_per_block": 8 * BLOCK_AUTH_BYTES, "fresh_bits_per_connection": fresh_bits,
            "epoch_bits_per_connection": epoch_bits, "epoch_max_handshakes": budget.epoch_max_handshakes,
            "epoch_max_age_s": budget.epoch_max_age,
            "max_distance_km": model.max_distance(model.GYS, vacuum_weak=True), "rows": rows}


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}" if x >= 0.01 else f"{x:.1e}"


def _table(report: dict[str, Any]) -> list[list[str]]:
    head = ["km", "pulses/block", "QBER", "asymptotic bit/s", "finite-key bit/s", "net of auth bit/s", "fresh conn/s",
            "epoch conn/s", "epoch peer pairs", "CPU s/block"]
    out = [head]
    for r in report["rows"]:
        qber = "-" if r["qber"] is None else f"{r['qber']:.2%}"
        out.append([f"{r['distance_km']:g}", f"{r['pulses_per_block']:.1e}", qber,
                    _fmt(r["asymptotic_rate_bps"]), _fmt(r["finite_rate_bps"]), _fmt(r["net_rate_bps"]),
                    _fmt(r["fresh_conn_per_s"]), _fmt(r["epoch_conn_per_s"]), _fmt(r["epoch_peer_pairs"]),
                    f"{r['cpu_s_per_block']:.2f}"])
    return out


def _notes(report: dict[str, Any]) -> list[str]:
    size = (f"{report['clicks_per_block']:.0e} detections" if report["clicks_per_block"]
            else f"{report['pulses_per_block']:.0e} pulses")
    return [
        f"Blocks of {size} at {report['pulse_rate_hz'] / 1e6:g} MHz, {report['blocks']} per distance, full "
        f"post-processing; rates per second of fibre time; each block spends {report['auth_bits_per_block']} "
        "bits on authentication.",
        f"fresh: {report['fresh_bits_per_connection']} bits per connection; epoch: one key per "
        f"{report['epoch_max_handshakes']} handshakes ({report['epoch_bits_per_connection']:g} bits each), renewed at "
        f"least every {report['epoch_max_age_s']:g} s per peer pair.",
        f"Asymptotic maximal distance {report['max_distance_km']:.0f} km; finite blocks stop much earlier "
        "(a zero means this block size gives no key there: larger blocks are needed).",
    ]


def format_link_report(report: dict[str, Any]) -> str:
    rows = _table(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["hybridkex bench link: handshake capacity of a QKD link vs its length", ""]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([*lines, "", *_notes(report)])


def format_link_markdown(report: dict[str, Any]) -> str:
    rows = _table(report)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(["# QKD link capacity", "", f"`{report['command']}`", "", *md, "", *_notes(report), ""])


def write_link_plot(report: dict[str, Any], directory: str | Path) -> Path:
    """``link-capacity.png``: connections per second vs distance, fresh and epoch, finite and asymptotic."""
    from .plots import _pyplot  # noqa: PLC0415 - same backend choice and error as the other plots

    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    d = [r["distance_km"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, color in (("fresh", "fresh (256 bits/connection)", "#c44e52"),
                              ("epoch", f"epoch (1 key / {report['epoch_max_handshakes']} handshakes)", "#4c72b0")):
        finite = [r[f"{key}_conn_per_s"] if r[f"{key}_conn_per_s"] > 0 else math.nan for r in rows]
        ax.plot(d, finite, "o-", color=color, label=f"{label}, finite blocks")
        ax.plot(d, [r[f"{key}_conn_per_s_asymptotic"] for r in rows], "--", color=color, alpha=0.6,
                label=f"{label}, asymptotic")
    ax.set_yscale("log")
    ax.set_xlabel("fibre length (km), GYS link, 2 MHz")
    ax.set_ylabel("handshakes per second the link carries")
    ax.set_title("QKD link capacity vs distance")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "link-capacity.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

