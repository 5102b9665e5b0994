"""Generate tests/vectors/hybridkex-v1-steady.json, the steady state's known-answer vectors.

Run from the repository root:  python tests/vectors/generate_steady_v1.py > tests/vectors/hybridkex-v1-steady.json

Each case starts from a fixed parent combined secret ``S`` (what one full handshake left both ends)
and names every public input of one steady-state connection: the suite, both identities, the ETSI
roles of the steady state (the client is the master), the connection counter, the QKD key it uses
and the key IDs it announces.  Every intermediate of docs/spec.md section 12 is recorded: the
handle, the authentication key ``A``, the identity body, its tag, the identity text, and the CatKDF
inputs and output that make the TLS PSK.  Every input is SHAKE-256 of a fixed label, so the file is
reproducible byte for byte; tests/test_steady_vectors.py re-runs this script and recomputes every
field twice (with hybridkex.steady.derive, and written out from the spec with hmac/hashlib).
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from typing import NamedTuple

from hybridkex.combiner import CombinedSecret
from hybridkex.hazmat import labels
from hybridkex.hazmat.encoding import lp_join
from hybridkex.hazmat.kdf import context_function
from hybridkex.steady import SteadyPeers
from hybridkex.steady.derive import SteadyIdentity, auth_key, identity_tag, steady_handle, steady_psk
from hybridkex.suites import get_suite

DEFAULT = "x25519-mlkem768-qkd-hkdfsha256"
SHA384 = "x25519-mlkem1024-qkd-hkdfsha384"


def stream(seed: str, n: int) -> bytes:
    return hashlib.shake_256(b"hybridkex-v1 steady vector " + seed.encode()).digest(n)


def key_id(seed: str) -> str:
    return str(uuid.UUID(bytes=stream(seed, 16), version=4))


class Case(NamedTuple):
    description: str
    suite: str
    seed: str
    counter: int
    epoch: bool  # the pair's epoch key (flag bit 0) rather than a fresh one
    with_qkd: bool  # False: no QKD key (an 'optional' policy whose key source failed)
    announced: int  # key IDs announced for later connections


CASES = [Case(*c) for c in (
    ("first steady-state connection: a reserved QKD key, four key IDs announced", DEFAULT, "case-1", 1, False,
     True, 4),
    ("a later connection: an announced key, nothing announced", DEFAULT, "case-2", 2, False, True, 0),
    ("ML-KEM-1024 / SHA-384 suite, counter 65536, eight key IDs announced (the maximum)", SHA384, "case-3", 65536,
     False, True, 8),
    ("epoch key budget: flag bit 0 set, the pair's epoch key", DEFAULT, "case-4", 3, True, True, 0),
    ("no QKD key (policy 'optional', KME unavailable): no key ID, empty binding", DEFAULT, "case-5", 5, False,
     False, 0),
    ("SHA-384 suite without a QKD key, counter 2^32 - 1", SHA384, "case-6", 2**32 - 1, False, False, 0),
)]


def make_case(case: Case) -> dict[str, object]:
    description, seed, counter, epoch, with_qkd = case.description, case.seed, case.counter, case.epoch, case.with_qkd
    suite = get_suite(case.suite)
    parent = stream(seed + " parent combined secret", suite.hash_len)
    secret = CombinedSecret(suite, parent)
    client, server = f"client-{seed}.example", f"server-{seed}.example"
    # The steady state's ETSI roles: the client is the master (docs/spec.md 12.4).
    peers = SteadyPeers(client_sae_id=f"sae-client-{seed}", client_kme_id=f"kme-a-{seed}",
                        server_sae_id=f"sae-server-{seed}", server_kme_id=f"kme-b-{seed}")
    used = (key_id(seed + " used key id"),) if with_qkd else ()
    announced = tuple(key_id(f"{seed} announced key id {i}") for i in range(case.announced))
    qkd_key = stream(seed + " qkd key", suite.qkd_key_bits // 8) if with_qkd else b""

    handle = steady_handle(secret)
    a = auth_key(secret)
    content = SteadyIdentity(handle, counter, epoch and with_qkd, used, announced)
    body = content.body()
    tag = identity_tag(a, suite, body)
    identity = content.encode(a, suite)
    binding = peers.binding(used) if used else None
    ma = lp_join(labels.PROTOCOL + b" initiator", client.encode())
    mb = lp_join(labels.PROTOCOL + b" responder", server.encode())
    context = lp_join(labels.STEADY_PSK_CONTEXT, body, binding.encode() if binding is not None else b"")
    psk = steady_psk(suite, key=a, qkd_key=qkd_key, body=body, binding=binding, client_identity=client,
                     server_identity=server)
    secret.erase()
    return {
        "description": description,
        "suite": suite.name,
        "hash": suite.hash,
        "tls_cipher": suite.tls_cipher,
        "parent_combined_secret": parent.hex(),
        "client_identity": client,
        "server_identity": server,
        "qkd_roles": {"master_sae_id": peers.client_sae_id, "master_kme_id": peers.client_kme_id,
                      "slave_sae_id": peers.server_sae_id, "slave_kme_id": peers.server_kme_id},
        "counter": counter,
        "epoch": content.epoch,
        "qkd_key_ids": list(used),
        "announced_key_ids": list(announced),
        "qkd_key": qkd_key.hex(),
        "handle": handle.hex(),
        "auth_key": a.hex(),
        "body": body.hex(),
        "tag": tag.hex(),
        "identity": identity.decode("ascii"),
        "psk_inputs": {
            "label": labels.steady_label(suite.label).hex(),
            "ikm": (qkd_key + a).hex(),
            "ma": ma.hex(),
            "mb": mb.hex(),
            "qkd_binding": binding.encode().hex() if binding is not None else "",
            "context": context.hex(),
            "kdf_context_hash": context_function(suite.kdf, context, ma, mb).hex(),
        },
        "psk": psk.hex(),
    }


def main() -> None:
    doc = {
        "source": "hybridkex (this project): self-computed known-answer vectors of the hybridkex-v1 steady state, "
                  "docs/spec.md section 12. Not an independent check.",
        "algorithm": "handle = derive(S, 'steady state handle', 16); A = derive(S, 'steady state authentication key', "
                     "HashLen); body = handle || u32(counter) || u8(flags) || u8(n) || n key IDs (16 bytes each) || "
                     "u8(m) || m announced key IDs; tag = HKDF-Expand(A, lp('hybridkex/v1') || lp(suite) || "
                     "lp('steady state identity tag') || lp(body), 16); identity = 'hk1-ss.' || base64url(body || "
                     "tag) without padding; psk = ETSI TS 103 744 CatKDF(psk = QKD key, k1 = A; MA, MB, context, "
                     "label, HashLen) with HKDF",
        "fields": "hex strings, except names, identities and key IDs (text); parent_combined_secret = S of the full "
                  "handshake (docs/spec.md 4.1); qkd_roles: the steady state's ETSI master (the client) and slave "
                  "(the server); psk_inputs: label (the HKDF salt), ikm = qkd_key || auth_key, ma, mb, qkd_binding "
                  "(docs/spec.md 4.2, empty without a QKD key), context, kdf_context_hash = H(lp(context) || lp(ma) "
                  "|| lp(mb)) (the HKDF info); psk = the TLS 1.3 external PSK for the identity",
        "cases": [make_case(c) for c in CASES],
    }
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
