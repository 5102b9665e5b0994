"""``hybridkex pki``: a demo CA and certificates for the KMEs, SAEs and peers (local runs only)."""

from __future__ import annotations

import argparse

from ..qkd.pki import DEFAULT_KMES, DEFAULT_PEERS, DEFAULT_SAES, DemoPKI

HELP = "create a demo CA and certificates for the simulated KMEs, the SAEs and the peers"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init",
        help="create DIR/ca.crt and NAME.crt + NAME.key for kme-a, kme-b, sae-a, sae-b and the peers",
        description="Create a demo PKI. The subject CN of each certificate is its ID: sae-a and sae-b are "
        "the SAE IDs (served by KME A and KME B), kme-a and kme-b the KME IDs. Not for production: the CA "
        "key is stored unencrypted next to the certificates.",
    )
    init.add_argument("directory", metavar="DIR", help="directory to create (or an empty one)")
    init.add_argument("--peer", action="append", metavar="NAME",
                      help=f"TLS peer certificate to create (repeatable; default: {', '.join(DEFAULT_PEERS)})")
    init.add_argument("--days", type=int, default=365, help="validity in days (default: %(default)s)")
    init.add_argument("--force", action="store_true", help="replace an existing PKI in DIR")
    issue = sub.add_parser("issue", help="add or re-issue one certificate signed by DIR's demo CA",
                           description="Issue NAME.crt + NAME.key with subject CN NAME, signed by the demo CA.")
    issue.add_argument("directory", metavar="DIR", help="a directory made by 'hybridkex pki init'")
    issue.add_argument("name", metavar="NAME", help="the entity's ID (becomes the subject CN)")
    issue.add_argument("--kind", choices=("sae", "kme", "peer"), default="sae",
                       help="sae: TLS client; kme and peer: TLS server and client on loopback (default: %(default)s)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME", help="extra DNS subject alt name")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDR", help="extra IP subject alt name")
    issue.add_argument("--days", type=int, default=365, help="validity in days (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.pki_command == "issue":
        pki = DemoPKI.load(args.directory)
        cert, key = pki.issue(args.name, kind=args.kind, dns=args.dns, ips=args.ip, days=args.days)
        print(f"issued {cert} and {key} (CN {args.name}, kind {args.kind})")
        return 0
    peers = tuple(args.peer) if args.peer else DEFAULT_PEERS
    pki = DemoPKI.create(args.directory, peers=peers, days=args.days, overwrite=args.force)
    print(f"demo PKI in {pki.directory} (for local use only; the CA key is not protected)")
    print(f"  CA     {pki.ca_cert}")
    for kind, names in (("KME", DEFAULT_KMES), ("SAE", DEFAULT_SAES), ("peer", peers)):
        for name in names:
            print(f"  {kind:6} {pki.cert(name)} + {pki.key(name).name}  (ID {name})")
    print(f"next: hybridkex kme --pki {pki.directory} --port-a 0 --port-b 0")
    return 0
