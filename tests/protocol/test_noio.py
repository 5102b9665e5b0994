"""Proof that the sans-IO core does no I/O: in a fresh interpreter, sockets, clocks and os.urandom
are made to raise *before* ``hybridkex.protocol`` is imported, file opening right after (the import
reads the package's version metadata), and then complete handshakes (PSK and hybrid PKI, with QKD)
run with injected randomness and time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import builtins, datetime as dt, hashlib, io, os, socket, sys, time

    # --- test setup that may do I/O: certificates (with cryptography only, not hybridkex) -------
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
    from cryptography.x509.oid import NameOID

    NOW = dt.datetime(2027, 1, 15, tzinfo=dt.timezone.utc)
    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    def cert(subject, issuer, key, signer, serial, ca, san=None):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(serial)
             .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return b.sign(signer, None)
    pki = {}
    for alg, gen in (("ed", ed25519.Ed25519PrivateKey.generate), ("ml", mldsa.MLDSA65PrivateKey.generate)):
        ca_key = gen()
        ca = cert(f"ca-{alg}", f"ca-{alg}", ca_key, ca_key, 1, True)
        for i, ident in enumerate(("client.example", "server.example")):
            k = gen()
            pki[(alg, ident)] = (cert(ident, f"ca-{alg}", k, ca_key, 10 + i, False, ident), k)
        pki[alg] = ca

    # --- from here on, any I/O is an error ------------------------------------------------------
    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"the core did I/O: {what}")
        return fail

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise AssertionError("the core did I/O: socket.socket")

    socket.socket = NoSocket
    for attr in ("create_connection", "getaddrinfo", "socketpair", "fromfd", "create_server"):
        setattr(socket, attr, forbidden(f"socket.{attr}"))
    for attr in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "sleep", "localtime", "gmtime"):
        setattr(time, attr, forbidden(f"time.{attr}"))
    os.urandom = forbidden("os.urandom")
    if hasattr(os, "getrandom"):
        os.getrandom = forbidden("os.getrandom")
    dt.datetime = type("NoNow", (dt.datetime,), {"now": forbidden("datetime.now"),
                                                  "utcnow": forbidden("datetime.utcnow")})

    import hybridkex.protocol as p
    from hybridkex.policy import Policy, QKDConfig
    from hybridkex.qkd.base import QKDKey

    # Reading the installed package's version metadata at import is the only file access allowed;
    # from here on files are forbidden too.
    builtins.open = forbidden("open")
    io.open = forbidden("io.open")

    for mod in ("hybridkex.io", "hybridkex.io.sync", "ssl", "asyncio", "aiohttp", "http.client", "sqlite3"):
        assert mod not in sys.modules, f"importing the core imported {mod}"

    class Rand:
        def __init__(self, seed):
            self.seed, self.n = seed, 0
        def __call__(self, n):
            self.n += 1
            return hashlib.shake_256(self.seed + self.n.to_bytes(8, "big")).digest(n)

    clock = lambda: 1_800_000_000.0  # 2027-01-15
    KEY = QKDKey("0b6ee5a8-6d2f-4f57-8a43-1d6b6c0e4b10", bytes(range(32)))

    def authenticators(mode, me, peer, role):
        if mode == "psk":
            return (p.PSKAuthenticator({peer: b"k" * 32}),)
        creds = {}
        for alg, field in (("ed", "ed25519"), ("ml", "mldsa65")):
            leaf, key = pki[(alg, me)]
            creds[field] = p.SigningCredential((leaf,), key)
        return (p.PKIAuthenticator([pki["ed"], pki["ml"]], **creds),)

    for mode in ("psk", "hybrid"):
        ini = p.Initiator(p.InitiatorConfig(
            "client.example", authenticators(mode, "client.example", "server.example", "initiator"),
            Policy(), QKDConfig("sae-a", "kme-a"), peer_identity="server.example"), randbytes=Rand(b"i"), clock=clock)
        res = p.Responder(p.ResponderConfig(
            "server.example", authenticators(mode, "server.example", "client.example", "responder"),
            Policy(), QKDConfig("sae-b", "kme-b")), randbytes=Rand(b"r"), clock=clock)
        res.receive_data(ini.data_to_send())
        ev = res.next_event()
        assert isinstance(ev, p.QKDKeysRequired), ev
        res.provide_qkd_keys([KEY])
        assert res.next_event() is p.NEED_DATA
        ini.receive_data(res.data_to_send())
        ev = ini.next_event()
        assert isinstance(ev, p.QKDKeysByIdRequired) and ev.key_ids == (KEY.key_id,), ev
        ini.provide_qkd_keys([KEY])
        a = ini.next_event()
        res.receive_data(ini.data_to_send())
        b = res.next_event()
        assert isinstance(a, p.HandshakeComplete) and isinstance(b, p.HandshakeComplete)
        assert a.session.tls_psk() == b.session.tls_psk()
        assert a.session.info.auth_mode == ("psk" if mode == "psk" else "pki-hybrid")
    print("OK: two handshakes without I/O")
''')


def test_core_does_no_io():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK: two handshakes without I/O" in proc.stdout


def test_the_patches_are_effective():
    """The same guard catches a deliberate clock read: the test can fail."""
    probe = SCRIPT.split("import hybridkex.protocol as p")[0] + "\nimport time\ntime.time()\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "the core did I/O: time.time" in proc.stderr
