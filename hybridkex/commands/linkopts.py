"""The ``--link bb84`` options shared by ``hybridkex kme`` and ``hybridkex demo``."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from ..qkdlink.session import LinkSettings

__all__ = ["add_link_options", "link_settings"]

#: Beyond this the GYS link gives no key at all (max_distance is ~140 km); refuse early, in one line.
MAX_DISTANCE_KM = 300.0


def add_link_options(parser: argparse.ArgumentParser, *, default_speedup: float) -> None:
    g = parser.add_argument_group("simulated QKD link (--link bb84)")
    g.add_argument("--link", choices=("model", "bb84"), default="model",
                   help="where keys come from: 'model' draws them at --rate; 'bb84' runs a decoy-state BB84 "
                        "link between the KMEs, with its classical channel over a TCP socket (default: model)")
    g.add_argument("--distance-km", type=float, default=50.0, metavar="KM",
                   help="fibre length of the bb84 link (GYS parameters, 0.21 dB/km; default: %(default)g)")
    g.add_argument("--pulses-per-block", type=float, default=1e8, metavar="N",
                   help="pulses per post-processing block (default: %(default).0e)")
    g.add_argument("--pulse-speedup", type=float, default=default_speedup, metavar="X",
                   help="run the 2 MHz source X times faster than real time; 0: as fast as the CPU allows. Status "
                        "reports the real-rate equivalent either way (default: %(default)g)")
    g.add_argument("--eavesdrop", metavar="intercept-resend:FRACTION",
                   help="an intercept-resend eavesdropper on FRACTION of the pulses (blocks abort on QBER)")
    g.add_argument("--mitm", metavar="flip:FRACTION|drop:FRACTION",
                   help="a man in the middle on the classical channel, flipping a bit in (or dropping) FRACTION of "
                        "the frames (the MAC catches it: block discarded, alarm)")
    g.add_argument("--link-bootstrap", metavar="FILE",
                   help="pre-shared secret that authenticates the first blocks (raw bytes; default: a fresh "
                        "random 4096-bit secret shared by the two simulated KMEs)")
    g.add_argument("--link-seed", type=int, metavar="N", help="seed the simulated photons (default: random)")


def _eavesdrop(text: str | None) -> float:
    if text is None:
        return 0.0
    kind, _, value = text.partition(":")
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if kind != "intercept-resend" or not 0.0 < fraction <= 1.0:
        raise ConfigurationError(f"{text!r}: expected intercept-resend:FRACTION with 0 < FRACTION <= 1, "
                                 "e.g. intercept-resend:0.1", field="--eavesdrop")
    return fraction


def link_settings(args: argparse.Namespace) -> LinkSettings | None:
    """The link the options describe, or ``None`` for ``--link model``; every bad value is one line."""
    # numpy and the link simulation load only when a link is asked for (the CLI starts fast).
    from ..qkdlink import model  # noqa: PLC0415
    from ..qkdlink.mitm import parse_mitm  # noqa: PLC0415
    from ..qkdlink.session import BLOCK_AUTH_BYTES, LinkSettings  # noqa: PLC0415
    if args.link != "bb84":
        for name in ("eavesdrop", "mitm", "link_bootstrap"):
            if getattr(args, name) is not None:
                raise ConfigurationError("needs --link bb84", field="--" + name.replace("_", "-"))
        return None
    if not 0.0 <= args.distance_km <= MAX_DISTANCE_KM:
        raise ConfigurationError(f"must be between 0 and {MAX_DISTANCE_KM:g} km", field="--distance-km")
    if not 1e4 <= args.pulses_per_block <= 1e10 or args.pulses_per_block != int(args.pulses_per_block):
        raise ConfigurationError("must be a whole number between 1e4 and 1e10", field="--pulses-per-block")
    if not args.pulse_speedup >= 0:
        raise ConfigurationError("must be >= 0 (0: as fast as the CPU allows)", field="--pulse-speedup")
    link = model.GYS.at(args.distance_km)
    if model.key_rate_vacuum_weak(link) <= 0:
        raise ConfigurationError(f"a {args.distance_km:g} km link gives no secret key (the GYS link reaches about "
                                 f"{model.max_distance(model.GYS, vacuum_weak=True):.0f} km); pick a shorter one",
                                 field="--distance-km")
    if args.link_bootstrap:
        try:
            bootstrap = Path(args.link_bootstrap).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {args.link_bootstrap}: {exc.strerror}",
                                     field="--link-bootstrap") from None
        if len(bootstrap) < 2 * BLOCK_AUTH_BYTES:
            raise ConfigurationError(f"{args.link_bootstrap} holds {8 * len(bootstrap)} bits; the first two blocks "
                                     f"need {16 * BLOCK_AUTH_BYTES}", field="--link-bootstrap")
    else:
        bootstrap = os.urandom(512)
    mitm = replace(parse_mitm(args.mitm), seed=args.link_seed) if args.mitm else None
    return LinkSettings(link=link, pulses_per_block=int(args.pulses_per_block), eavesdrop_fraction=_eavesdrop(
        args.eavesdrop), seed=args.link_seed, bootstrap=bootstrap, speedup=args.pulse_speedup, mitm=mitm)
