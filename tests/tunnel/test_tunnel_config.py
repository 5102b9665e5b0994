"""Tunnel configuration: TOML + flags -> frozen objects; every mistake is one line naming the field."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hybridkex import cli
from hybridkex.exceptions import ConfigurationError, UnsupportedAlgorithm
from hybridkex.suites import SUITES
from hybridkex.tunnel import channel
from hybridkex.tunnel.config import Address, Overrides, load_config
from hybridkex.tunnel.material import load_channel_material

GOOD = """\
listen = "127.0.0.1:8443"
target = "127.0.0.1:8080"
identity = "server"

[[peers]]
identity = "client-a"
mode = "psk"
psk_file = "a.psk"

[policy]
qkd = "disabled"
"""

PEER_A = '[[peers]]\nidentity = "client-a"\nmode = "psk"\npsk_file = "a.psk"\n'
TOP = 'listen = "127.0.0.1:8443"\ntarget = "127.0.0.1:8080"\nidentity = "server"\n'
NO_QKD = '[policy]\nqkd = "disabled"\n'
TOP_KEYS = ("health, identity, kme, limits, listen, logging, metrics, peers, policy, recycle, state, target, "
            "target_identity, timeouts, workers")
RECYCLED = GOOD.replace('mode = "psk"', 'mode = "recycled"\nbootstrap = "psk"')
STORE = '[recycle]\nstore = "keys.sqlite3"\n'


@pytest.fixture
def confdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / f"{name}.psk").write_bytes(os.urandom(32))
        (tmp_path / f"{name}.psk").chmod(0o600)
    (tmp_path / "open.psk").write_bytes(os.urandom(32))
    (tmp_path / "open.psk").chmod(0o644)
    for name in ("cert.pem", "ca.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    (tmp_path / "key.pem").chmod(0o600)
    (tmp_path / "shared-key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    (tmp_path / "shared-key.pem").chmod(0o640)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_test_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process CLI runs must behave as for a user, whatever the test runner's environment holds.
    monkeypatch.delenv("HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL", raising=False)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = cli.main(argv)
    return code, capsys.readouterr().err.splitlines()


# (test id, TOML text, expected error line after "hybridkex: error: config tunnel.toml: ")
BAD_CONFIGS: list[tuple[str, str, str]] = [
    ("missing-listen", GOOD.replace('listen = "127.0.0.1:8443"\n', ""),
     'listen: missing required key; set listen = "HOST:PORT" or pass --listen'),
    ("listen-no-port", GOOD.replace("127.0.0.1:8443", "8443"), "listen: expected HOST:PORT, got '8443'"),
    ("listen-port-range", GOOD.replace("127.0.0.1:8443", "127.0.0.1:70000"),
     "listen: port must be between 0 and 65535, got 70000"),
    ("listen-no-host", GOOD.replace("127.0.0.1:8443", ":8443"),
     "listen: missing host in ':8443' (use 0.0.0.0 or [::] for every interface)"),
    ("listen-ipv6-unbracketed", GOOD.replace("127.0.0.1:8443", "::1:8443"),
     "listen: write IPv6 addresses as [ADDR]:PORT, got '::1:8443'"),
    ("listen-integer", GOOD.replace('"127.0.0.1:8443"', "8443"), "listen: expected a string, got integer 8443"),
    ("target-port-zero", GOOD.replace("127.0.0.1:8080", "127.0.0.1:0"),
     "target: port must be between 1 and 65535, got 0"),
    ("identity-space", GOOD.replace('identity = "server"', 'identity = "my server"'),
     "identity: must be printable ASCII without spaces"),
    ("identity-empty", GOOD.replace('identity = "server"', 'identity = ""'), "identity: must not be empty"),
    ("unknown-top-key", GOOD.replace("listen =", "lisen = 1\nlisten ="),
     "unknown key 'lisen' (did you mean 'listen'?)"),
    ("no-plain-channel-key", "channel = \"plain\"\n" + GOOD, f"unknown key 'channel' (known keys here: {TOP_KEYS})"),
    ("target-identity-on-server", 'target_identity = "x"\n' + GOOD,
     "target_identity: not allowed on the server side (it accepts every configured peer)"),
    ("no-peers", TOP + NO_QKD,
     "peers: no peers configured; add a [[peers]] table (or --peer NAME=PSK_FILE) for each peer allowed to connect"),
    ("peers-not-array", TOP + 'peers = "client-a"\n' + NO_QKD, "peers: expected an array, got string 'client-a'"),
    ("peer-mode-typo", GOOD.replace('mode = "psk"', 'mode = "pks"'),
     'peers[0].mode: expected one of "psk", "pki", "recycled", got "pks"'),
    ("peer-mode-missing", GOOD.replace('mode = "psk"\n', ""),
     'peers[0].mode: missing required key; set mode = "psk", "pki" or "recycled"'),
    ("recycled-without-store", RECYCLED, 'peers[0].mode: missing; a peer with mode = "recycled" needs [recycle] '
     'store = "PATH" (this side\'s key store, created 0600 on first use)'),
    ("recycled-without-bootstrap", RECYCLED.replace('bootstrap = "psk"\n', "") + STORE,
     'peers[0].bootstrap: missing required key with mode = "recycled"; set bootstrap = "psk" (with psk_file) '
     'or "pki" (with cert, key, ca): it authenticates the first handshake'),
    ("recycled-bad-bootstrap", RECYCLED.replace('bootstrap = "psk"', 'bootstrap = "recycled"') + STORE,
     'peers[0].bootstrap: expected one of "psk", "pki", got "recycled"'),
    ("recycled-psk-with-cert", RECYCLED.replace('psk_file = "a.psk"', 'psk_file = "a.psk"\ncert = "cert.pem"')
     + STORE, 'peers[0].cert: not allowed with bootstrap = "psk" (it belongs to bootstrap = "pki")'),
    ("bootstrap-without-recycled", GOOD.replace('mode = "psk"', 'mode = "psk"\nbootstrap = "psk"'),
     'peers[0].bootstrap: not allowed with mode = "psk" (it belongs to mode = "recycled")'),
    ("recycle-store-missing", RECYCLED + "[recycle]\n",
     'recycle.store: missing required key; set store = "PATH" (a file this side creates and keeps, e.g. '
     '"/var/lib/hybridkex/tunnel-keys.sqlite3")'),
    ("recycle-store-directory", RECYCLED + '[recycle]\nstore = "."\n', "recycle.store: not a regular file: {dir}"),
    ("recycle-policy-typo", RECYCLED + STORE + 'policy = "once"\n',
     'recycle.policy: expected one of "bootstrap-once", "recycled-with-fallback", "rebootstrap", got "once"'),
    ("peer-identity-missing", GOOD.replace('identity = "client-a"\n', ""),
     "peers[0].identity: missing required key"),
    ("peer-duplicate", TOP + PEER_A + PEER_A.replace("a.psk", "b.psk") + NO_QKD,
     "peers[1].identity: duplicate identity 'client-a' (also peers[0])"),
    ("psk-file-missing", TOP + PEER_A + PEER_A.replace("client-a", "client-b").replace("a.psk", "nope/x.psk") + NO_QKD,
     "peers[1].psk_file: file not found: {dir}/nope/x.psk"),
    ("psk-file-is-dir", GOOD.replace('"a.psk"', '"."'), "peers[0].psk_file: not a regular file: {dir}"),
    ("psk-world-readable", GOOD.replace("a.psk", "open.psk"),
     "peers[0].psk_file: {dir}/open.psk is accessible by group/others (mode 0644); a key file must be private: "
     "run chmod 600 {dir}/open.psk"),
    ("psk-with-cert", GOOD.replace('psk_file = "a.psk"', 'psk_file = "a.psk"\ncert = "cert.pem"'),
     'peers[0].cert: not allowed with mode = "psk" (certificates belong to mode = "pki")'),
    ("pki-missing-ca", TOP + '[[peers]]\nidentity = "c"\nmode = "pki"\ncert = "cert.pem"\nkey = "key.pem"\n' + NO_QKD,
     "peers[0].ca: missing required key"),
    ("pki-with-psk", TOP + '[[peers]]\nidentity = "c"\nmode = "pki"\npsk_file = "a.psk"\n' + NO_QKD,
     'peers[0].psk_file: not allowed with mode = "pki" (a key file belongs to mode = "psk")'),
    ("peer-unknown-key", GOOD.replace('mode = "psk"', 'mode = "psk"\npsk = "abc"'),
     "unknown key 'peers[0].psk' (did you mean 'peers[0].psk_file'?)"),
    ("policy-not-table", TOP + 'policy = "strict"\n' + PEER_A, "policy: expected a table, got string 'strict'"),
    ("qkd-mode", GOOD.replace('qkd = "disabled"', 'qkd = "maybe"'),
     'policy.qkd: expected one of "required", "optional", "disabled", got "maybe"'),
    ("qkd-required-without-kme", GOOD.replace('qkd = "disabled"', 'qkd = "required"'),
     'policy.qkd: "required" needs a [kme] table; configure a KME or set '
     'policy.qkd = "disabled"'),
    ("qkd-default-is-required", GOOD.replace('qkd = "disabled"', ""),
     'policy.qkd: "required" needs a [kme] table; configure a KME or set '
     'policy.qkd = "disabled"'),
    ("suite-unknown", GOOD + 'suites = ["x25519-mlkem768-hkdfsha256", "x25519-rsa"]\n',
     f"policy.suites[1]: unknown suite 'x25519-rsa'; known suites: {', '.join(SUITES)}"),
    ("suite-retired", GOOD + 'suites = ["x25519-hqc128-qkd-hkdfsha256"]\n',
     "policy.suites[0]: suite 'x25519-hqc128-qkd-hkdfsha256' was removed: liboqs 0.16 has no HQC-128 (HQC is now "
     "HQC-1/-3/-5); use x25519-hqc1-qkd-hkdfsha256"),
    ("suite-needs-qkd", GOOD + 'suites = ["x25519-mlkem768-qkd-hkdfsha256"]\n',
     "policy.suites[0]: suite 'x25519-mlkem768-qkd-hkdfsha256' needs a QKD key but policy.qkd = \"disabled\""),
    ("suite-lacks-qkd", GOOD.replace('qkd = "disabled"', 'qkd = "required"\nsuites = ["x25519-mlkem768-hkdfsha256"]'),
     "policy.suites[0]: suite 'x25519-mlkem768-hkdfsha256' has no QKD component but policy.qkd = \"required\""),
    ("suites-empty", GOOD + "suites = []\n", "policy.suites: must list at least one suite"),
    ("suite-twice", GOOD + 'suites = ["x25519-mlkem768-hkdfsha256", "x25519-mlkem768-hkdfsha256"]\n',
     "policy.suites[1]: suite 'x25519-mlkem768-hkdfsha256' is listed twice"),
    ("key-budget", GOOD + 'key_budget = "weekly"\n',
     'policy.key_budget: expected one of "fresh", "epoch", got "weekly"'),
    ("kme-http", GOOD + '[kme]\nurl = "http://kme"\n',
     "kme.url: must be an https:// URL (ETSI GS QKD 014 uses mutual TLS), got 'http://kme'"),
    ("kme-missing-cert", GOOD + '[kme]\nurl = "https://kme:8443"\nsae_id = "A"\n', "kme.cert: missing required key"),
    ("kme-embedded-with-url", GOOD + '[kme]\nembedded = true\nurl = "https://kme"\n',
     "kme.url: not allowed with embedded = true (the embedded KME needs no endpoint)"),
    ("kme-needs-peer-sae-id", GOOD.replace('qkd = "disabled"', 'qkd = "optional"') + "[kme]\nembedded = true\n",
     "peers[0].sae_id: missing; policy.qkd = \"optional\" needs each peer's SAE ID"),
    ("handshake-timeout-zero", GOOD + "[timeouts]\nhandshake = 0\n",
     "timeouts.handshake: must be between 0.001 and 3600, got 0"),
    ("idle-negative", GOOD + "[timeouts]\nidle = -1\n", "timeouts.idle: must be 0 or between 0.001 and 604800, got -1"),
    ("drain-string", GOOD + '[timeouts]\ndrain = "30s"\n', "timeouts.drain: expected a number, got string '30s'"),
    ("drain-nan", GOOD + "[timeouts]\ndrain = nan\n", "timeouts.drain: must be between 0 and 86400, got nan"),
    ("timeouts-unknown", GOOD + "[timeouts]\nread = 5\n",
     "unknown key 'timeouts.read' (known keys here: connect, drain, handshake, idle)"),
    ("max-connections-zero", GOOD + "[limits]\nmax_connections = 0\n",
     "limits.max_connections: must be between 1 and 1000000, got 0"),
    ("max-connections-float", GOOD + "[limits]\nmax_connections = 1.5\n",
     "limits.max_connections: expected an integer, got number 1.5"),
    ("burst-bool", GOOD + "[limits]\nhandshake_burst = true\n",
     "limits.handshake_burst: expected an integer, got boolean True"),
    ("rate-negative", GOOD + "[limits]\nhandshake_rate = -2\n",
     "limits.handshake_rate: must be 0 or between 0.0001 and 1e+06, got -2"),
    ("log-format", GOOD + '[logging]\nformat = "xml"\n', 'logging.format: expected one of "text", "json", got "xml"'),
    ("log-level", GOOD + '[logging]\nlevel = "verbose"\n',
     'logging.level: expected one of "debug", "info", "warning", "error", got "verbose"'),
    ("metrics-enabled-string", GOOD + '[metrics]\nenabled = "yes"\n',
     "metrics.enabled: expected a boolean, got string 'yes'"),
    ("metrics-listen", GOOD + '[metrics]\nlisten = "localhost"\n',
     "metrics.listen: expected HOST:PORT, got 'localhost'"),
    ("metrics-typo", GOOD + '[metrics]\nlistne = "127.0.0.1:1"\n',
     "unknown key 'metrics.listne' (did you mean 'metrics.listen'?)"),
    ("health-int", GOOD + "[health]\nenabled = 1\n", "health.enabled: expected a boolean, got integer 1"),
]


@pytest.mark.parametrize(("toml", "expected"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_field(confdir: Path, capsys: pytest.CaptureFixture[str],
                                                  toml: str, expected: str) -> None:
    (confdir / "tunnel.toml").write_text(toml)
    code, err = run_cli(["tunnel", "server", "--config", "tunnel.toml"], capsys)
    assert code == 2
    assert err == ["hybridkex: error: config tunnel.toml: " + expected.format(dir=confdir)]


# A misspelt key replaces the key it was meant to be, at every table level: the typo is named, with
# the key it resembles, never reported as the (now missing) real key.
TYPOS: list[tuple[str, str, str]] = [
    ("top", GOOD.replace("listen =", "lisen ="), "lisen", "listen"),
    ("top-table", GOOD.replace("[policy]", "[polcy]"), "polcy", "policy"),
    ("peers", GOOD.replace("psk_file =", "pskfile ="), "peers[0].pskfile", "peers[0].psk_file"),
    ("policy", GOOD.replace("qkd =", "qdk ="), "policy.qdk", "policy.qkd"),
    ("kme", GOOD.replace('qkd = "disabled"', 'qkd = "required"')
     + '[kme]\nurl = "https://k:1"\nsaeid = "s"\n', "kme.saeid", "kme.sae_id"),
    ("timeouts", GOOD + "[timeouts]\nhandshak = 5\n", "timeouts.handshak", "timeouts.handshake"),
    ("limits", GOOD + "[limits]\nmax_connection = 5\n", "limits.max_connection", "limits.max_connections"),
    ("logging", GOOD + '[logging]\nformt = "json"\n', "logging.formt", "logging.format"),
    ("metrics", GOOD + "[metrics]\nenable = true\n", "metrics.enable", "metrics.enabled"),
    ("health", GOOD + "[health]\nenabld = true\n", "health.enabld", "health.enabled"),
]


@pytest.mark.parametrize(("toml", "typo", "meant"), [c[1:] for c in TYPOS], ids=[c[0] for c in TYPOS])
def test_a_typo_is_named_with_the_key_it_resembles(confdir: Path, capsys: pytest.CaptureFixture[str],
                                                   toml: str, typo: str, meant: str) -> None:
    (confdir / "tunnel.toml").write_text(toml)
    code, err = run_cli(["tunnel", "server", "--config", "tunnel.toml"], capsys)
    assert (code, err) == (2, [f"hybridkex: error: config tunnel.toml: unknown key '{typo}' (did you mean "
                               f"'{meant}'?)"])


def test_invalid_toml_syntax(confdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (confdir / "tunnel.toml").write_text("listen = \n")
    code, err = run_cli(["tunnel", "server", "--config", "tunnel.toml"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("hybridkex: error: config tunnel.toml: invalid TOML: ") and "line 1" in err[0]


def test_missing_config_file(confdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["tunnel", "client", "--config", "nope.toml"], capsys)
    assert (code, err) == (2, ["hybridkex: error: config nope.toml: cannot read: No such file or directory"])


CLIENT_BASE = ["tunnel", "client", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2", "--identity", "c",
               "--qkd", "disabled"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["tunnel", "server", "--listen", "127.0.0.1:1"],
     'target: missing required key; set target = "HOST:PORT" or pass --target'),
    ([*CLIENT_BASE, "--peer", "s=a.psk", "--max-connections", "ten"],
     "option --max-connections (limits.max_connections): expected an integer, got 'ten'"),
    ([*CLIENT_BASE, "--peer", "s=a.psk", "--max-connections", "0"],
     "option --max-connections (limits.max_connections): must be between 1 and 1000000, got 0"),
    ([*CLIENT_BASE, "--peer", "s=a.psk", "--idle-timeout", "soon"],
     "option --idle-timeout (timeouts.idle): expected a number, got 'soon'"),
    ([*CLIENT_BASE, "--peer", "server"], "option --peer: expected NAME=PSK_FILE, got 'server'"),
    ([*CLIENT_BASE, "--peer", "s=missing.psk"], "option --peer (peers[0].psk_file): file not found: {dir}/missing.psk"),
    ([*CLIENT_BASE, "--peer", "s=a.psk", "--peer", "t=b.psk"],
     "target_identity: missing; 2 peers are configured, so name the tunnel server at target"),
    ([*CLIENT_BASE, "--peer", "s=a.psk", "--target-identity", "nobody"],
     "option --target-identity (target_identity): no peer with identity 'nobody' in peers"),
    ([*CLIENT_BASE, "--peer", "s=a.psk", "--log-format", "xml"],
     'option --log-format (logging.format): expected one of "text", "json", got "xml"'),
    ([*CLIENT_BASE, "--peer", "s=a.psk", "--metrics-listen", "127.0.0.1"],
     "option --metrics-listen (metrics.listen): expected HOST:PORT, got '127.0.0.1'"),
    ([*CLIENT_BASE, "--peer", "s=a.psk", "--suite", "x25519-mlkem768-qkd-hkdfsha256"],
     "option --suite (policy.suites[0]): suite 'x25519-mlkem768-qkd-hkdfsha256' needs a QKD key but "
     'policy.qkd = "disabled"'),
])
def test_bad_flags_are_one_line_naming_the_flag(confdir: Path, capsys: pytest.CaptureFixture[str],
                                                argv: list[str], expected: str) -> None:
    code, err = run_cli(argv, capsys)
    assert (code, err) == (2, ["hybridkex: error: " + expected.format(dir=confdir)])


def _parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def test_flags_override_the_file_and_objects_are_frozen(confdir: Path) -> None:
    (confdir / "tunnel.toml").write_text(GOOD + "[limits]\nmax_connections = 5\nhandshake_burst = 9\n")
    args = _parse(["tunnel", "server", "--config", "tunnel.toml", "--max-connections", "7", "--log-format", "json",
                   "--peer", "client-z=b.psk", "--metrics"])
    cfg = load_config("server", "tunnel.toml", Overrides.from_namespace(args))
    assert cfg.limits.max_connections == 7  # flag wins
    assert cfg.limits.handshake_burst == 9  # file value kept where no flag is given
    assert cfg.logging.format == "json"
    assert [p.identity for p in cfg.peers] == ["client-z"]  # --peer replaces the file's peers
    assert cfg.peers[0].psk_file == confdir / "b.psk"
    assert cfg.metrics.enabled and cfg.metrics.listen == Address("127.0.0.1", 9180)
    assert cfg.source == confdir / "tunnel.toml"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.limits.max_connections = 1  # type: ignore[misc]


def test_defaults(confdir: Path) -> None:
    cfg = load_config("server", "tunnel.toml" if (confdir / "tunnel.toml").write_text(GOOD) else None)
    assert cfg.role == "server" and cfg.listen == Address("127.0.0.1", 8443)
    assert not cfg.metrics.enabled and not cfg.health.enabled
    assert cfg.metrics.listen.is_loopback and cfg.metrics.listen.port == 9180
    assert cfg.policy.suites == ("x25519-mlkem768-hkdfsha256",) and cfg.policy.key_budget == "fresh"
    assert (cfg.timeouts.handshake, cfg.timeouts.idle, cfg.timeouts.drain) == (10.0, 300.0, 30.0)
    assert (cfg.limits.max_connections, cfg.limits.handshake_rate, cfg.limits.handshake_burst) == (1024, 500.0, 1000)
    assert (cfg.limits.address_rate, cfg.limits.address_burst) == (20.0, 256)
    assert (cfg.logging.format, cfg.logging.level) == ("text", "info")
    assert cfg.warnings == ()
    client = load_config("client", "tunnel.toml")
    assert client.target_identity == "client-a"  # the only peer
    assert client.limits.handshake_rate == client.limits.address_rate == 0  # metered by the server


def test_full_config_parses(confdir: Path) -> None:
    (confdir / "full.toml").write_text("""\
listen = "[::1]:8443"
target = "backend.internal:8080"
identity = "server.example"

[[peers]]
identity = "client-a"
mode = "psk"
psk_file = "a.psk"
sae_id = "SAE_A"

[[peers]]
identity = "spiffe://example/client-b"
mode = "pki"
cert = "cert.pem"
key = "shared-key.pem"
ca = "ca.pem"
sae_id = "SAE_B"

[kme]
url = "https://kme-1.example:8443"
sae_id = "SAE_S"
cert = "cert.pem"
key = "key.pem"
ca = "ca.pem"

[policy]
suites = ["x25519-mlkem1024-qkd-hkdfsha384", "x25519-mlkem768-hkdfsha256"]
qkd = "optional"
key_budget = "epoch"

[timeouts]
handshake = 2.5
idle = 0
drain = 5
connect = 1

[limits]
max_connections = 10
handshake_rate = 0
handshake_burst = 1

[logging]
format = "json"
level = "debug"

[metrics]
enabled = true
listen = "0.0.0.0:9999"

[health]
enabled = true
""")
    cfg = load_config("server", "full.toml")
    assert cfg.listen == Address("::1", 8443) and str(cfg.listen) == "[::1]:8443"
    assert cfg.target == Address("backend.internal", 8080)
    assert cfg.peer("spiffe://example/client-b") is not None
    assert cfg.peers[1].mode == "pki" and cfg.peers[1].key == confdir / "shared-key.pem"
    assert cfg.kme is not None and cfg.kme.url == "https://kme-1.example:8443" and cfg.kme.key == confdir / "key.pem"
    assert cfg.policy.suites == ("x25519-mlkem1024-qkd-hkdfsha384", "x25519-mlkem768-hkdfsha256")
    assert (cfg.policy.qkd, cfg.policy.key_budget) == ("optional", "epoch")
    assert cfg.timeouts.idle == 0 and cfg.limits.handshake_rate == 0
    assert cfg.health.enabled and cfg.metrics.listen == Address("0.0.0.0", 9999)
    # Allowed but unwise: a group-readable private key and a metrics endpoint beyond loopback.
    assert [w.field for w in cfg.warnings] == ["peers[1].key", "metrics.listen"]
    assert "mode 0640" in cfg.warnings[0].message


def test_check_config_prints_a_summary(confdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (confdir / "tunnel.toml").write_text(GOOD)
    code = cli.main(["tunnel", "server", "--config", "tunnel.toml", "--check-config"])
    out = capsys.readouterr().out
    assert code == 0
    assert out == ("hybridkex: configuration OK: tunnel server listen=127.0.0.1:8443 target=127.0.0.1:8080 "
                   "identity=server peers=1 suites=x25519-mlkem768-hkdfsha256 qkd=disabled\n")


def test_cli_offers_no_insecure_mode() -> None:
    parser = cli.build_parser()
    for role in ("server", "client"):
        with pytest.raises(SystemExit):
            parser.parse_args(["tunnel", role, "--insecure"])
    help_text = subprocess.run([sys.executable, "-m", "hybridkex", "tunnel", "server", "--help"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    assert "--config" in help_text and "--listen" in help_text
    assert "insecure" not in help_text.lower() and "plain" not in help_text.lower()


@pytest.mark.parametrize("env", [
    {"HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "1"},
    {"HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "yes", "HYBRIDKEX_TESTING": "1"},
    {"HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "1", "HYBRIDKEX_TESTING": "true"},
])
def test_test_hook_is_refused_outside_tests(confdir: Path, env: dict[str, str]) -> None:
    (confdir / "tunnel.toml").write_text(GOOD)
    base = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDKEX_T")}
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "tunnel", "server", "--config", "tunnel.toml"],
                          capture_output=True, text=True, timeout=60, env={**base, **env}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "hybridkex: error: HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL: test-only hook that disables all security; "
        "refused outside the test suite, unset it"]


def test_real_process_reports_config_error_in_one_line(confdir: Path) -> None:
    (confdir / "tunnel.toml").write_text(GOOD.replace("a.psk", "gone.psk"))
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "tunnel", "server", "--config", "tunnel.toml"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"hybridkex: error: config tunnel.toml: peers[0].psk_file: file not found: {confdir}/gone.psk"]


def test_missing_secure_channel_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "SECURE_MODULE", "hybridkex.tunnel._no_such_module")
    with pytest.raises(UnsupportedAlgorithm, match="secure channel is not available"):
        channel.resolve_channel_provider({})
    provider, insecure = channel.resolve_channel_provider(
        {"HYBRIDKEX_TESTING": "1", "HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "1"})
    assert insecure and provider is not None
    with pytest.raises(ConfigurationError):
        channel.resolve_channel_provider({"HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "1"})


def test_reload_keeps_flag_overrides(confdir: Path) -> None:
    (confdir / "tunnel.toml").write_text(GOOD)
    overrides = Overrides.from_namespace(_parse(["tunnel", "server", "--max-connections", "3"]))
    first = load_config("server", "tunnel.toml", overrides)
    (confdir / "tunnel.toml").write_text(GOOD + "[limits]\nmax_connections = 50\nhandshake_burst = 2\n")
    second = load_config("server", "tunnel.toml", overrides)
    assert first.limits.max_connections == second.limits.max_connections == 3
    assert second.limits.handshake_burst == 2


def test_busy_listen_address_is_one_line_naming_listen(confdir: Path) -> None:
    (confdir / "tunnel.toml").write_text(GOOD)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        env = {**os.environ, "HYBRIDKEX_TESTING": "1", "HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "1"}
        proc = subprocess.run([sys.executable, "-m", "hybridkex", "tunnel", "server", "--config", "tunnel.toml",
                               "--listen", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"hybridkex: error: listen: cannot listen on 127.0.0.1:{port}: address already in use")


# --- --check-config loads what startup loads ----------------------------------------------------------


@pytest.fixture(scope="module")
def demo_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real certificates and keys (`hybridkex pki init`): SAE certificates for the KME, Ed25519 peers."""
    directory = tmp_path_factory.mktemp("pki")
    subprocess.run([sys.executable, "-m", "hybridkex", "pki", "init", str(directory)], check=True,
                   capture_output=True, timeout=60)
    return directory


def _kme_table(pki: Path, *, key: str = "sae-b.key", ca: str = "ca.crt") -> str:
    return (f'[kme]\nurl = "https://127.0.0.1:1"\nsae_id = "sae-b"\ncert = "{pki / "sae-b.crt"}"\n'
            f'key = "{pki / key}"\nca = "{pki / ca}"\n')


def _material_cases(pki: Path, d: Path) -> dict[str, tuple[str, str]]:
    """Configurations whose schema is valid but whose files startup cannot use: (TOML, error line)."""
    (d / "short.psk").write_bytes(os.urandom(10))
    (d / "short.psk").chmod(0o600)
    (pki / "not-pem.crt").write_text("this is not a certificate\n")
    qkd_peer = PEER_A + 'sae_id = "sae-a"\n'
    pki_peer = (f'[[peers]]\nidentity = "client-a"\nmode = "pki"\ncert = "{pki / "peer-a.crt"}"\n'
                f'key = "{pki / "peer-b.key"}"\nca = "{pki / "ca.crt"}"\n')
    return {
        "short-psk": (GOOD.replace("a.psk", "short.psk"),
                      f"peers[0].psk_file: {d}/short.psk holds 10 bytes; a PSK must be 32..1024 bytes (create one "
                      "with `hybridkex genpsk FILE`)"),
        "kme-ca-not-pem": (TOP + qkd_peer + _kme_table(pki, ca="not-pem.crt"),
                           f"kme.ca: {pki}/not-pem.crt holds no PEM certificate"),
        "kme-cert-key-mismatch": (TOP + qkd_peer + _kme_table(pki, key="sae-a.key"),
                                  f"kme.cert/key: the private key in {pki}/sae-a.key does not belong to the "
                                  f"certificate in {pki}/sae-b.crt"),
        "peer-cert-key-mismatch": (TOP + pki_peer + NO_QKD,
                                   f"peers[0].cert/key: the private key in {pki}/peer-b.key does not belong to "
                                   f"the certificate in {pki}/peer-a.crt"),
    }


@pytest.mark.parametrize("case", ["short-psk", "kme-ca-not-pem", "kme-cert-key-mismatch", "peer-cert-key-mismatch"])
def test_check_config_fails_where_startup_fails_with_the_same_line(
        confdir: Path, demo_pki: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    toml, expected = _material_cases(demo_pki, confdir)[case]
    (confdir / "tunnel.toml").write_text(toml)
    line = "hybridkex: error: config tunnel.toml: " + expected
    assert run_cli(["tunnel", "server", "--config", "tunnel.toml", "--check-config"], capsys) == (2, [line])
    # Startup, as a real process (a bug here must not leave a server running inside the test process).
    base = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDKEX_T")}
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "tunnel", "server", "--config", "tunnel.toml"],
                          capture_output=True, text=True, timeout=60, env=base, cwd=confdir, check=False)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [line])


def test_check_config_accepts_real_files(confdir: Path, demo_pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (confdir / "tunnel.toml").write_text(TOP + PEER_A + 'sae_id = "sae-a"\n' + _kme_table(demo_pki))
    code = cli.main(["tunnel", "server", "--config", "tunnel.toml", "--check-config"])
    out = capsys.readouterr()
    assert (code, out.err) == (0, "") and out.out.startswith("hybridkex: configuration OK: tunnel server ")


def test_the_kme_retry_budget_reaches_the_kme_client(confdir: Path, demo_pki: Path) -> None:
    # A KME that takes longer than ~2 s to restart needs a larger budget than the client's default.
    table = _kme_table(demo_pki) + "retries = 12\nbackoff = 0.25\nmax_backoff = 4\n"
    (confdir / "tunnel.toml").write_text(TOP + PEER_A + 'sae_id = "sae-a"\n' + table)
    material = load_channel_material(load_config("server", "tunnel.toml"))
    try:
        client = material.kme_client
        assert client is not None and (client.retries, client.backoff, client.max_backoff) == (12, 0.25, 4.0)
    finally:
        material.close()
    (confdir / "tunnel.toml").write_text(TOP + PEER_A + 'sae_id = "sae-a"\n' + _kme_table(demo_pki))
    default = load_config("server", "tunnel.toml").kme
    assert default is not None and (default.retries, default.backoff, default.max_backoff) == (5, 0.1, 2.0)
    args = _parse(["tunnel", "server", "--config", "tunnel.toml", "--kme-retries", "30"])
    flagged = load_config("server", "tunnel.toml", Overrides.from_namespace(args)).kme
    assert flagged is not None and flagged.retries == 30


@pytest.mark.parametrize(("extra", "expected"), [
    ("retries = -1\n", "kme.retries: must be between 0 and 1000, got -1"),
    ("retries = 2.5\n", "kme.retries: expected an integer, got number 2.5"),
    ("backoff = 3\nmax_backoff = 1\n", "kme.max_backoff: must be >= kme.backoff (3), got 1"),
])
def test_a_bad_kme_retry_budget_is_one_line(confdir: Path, demo_pki: Path, capsys: pytest.CaptureFixture[str],
                                            extra: str, expected: str) -> None:
    (confdir / "tunnel.toml").write_text(TOP + PEER_A + 'sae_id = "sae-a"\n' + _kme_table(demo_pki) + extra)
    line = "hybridkex: error: config tunnel.toml: " + expected
    assert run_cli(["tunnel", "server", "--config", "tunnel.toml", "--check-config"], capsys) == (2, [line])


def test_check_config_of_a_recycled_peer_creates_no_store_and_refuses_a_foreign_file(
        confdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (confdir / "tunnel.toml").write_text(RECYCLED + STORE)
    code, err = run_cli(["tunnel", "server", "--config", "tunnel.toml", "--check-config"], capsys)
    assert code == 0, err
    assert not (confdir / "keys.sqlite3").exists()  # the tunnel creates it when it starts, not a check
    (confdir / "keys.sqlite3").write_text("someone else's file\n")
    code, err = run_cli(["tunnel", "server", "--config", "tunnel.toml", "--check-config"], capsys)
    assert code == 10 and len(err) == 1, err
    assert f"not a hybridkex key store: {confdir / 'keys.sqlite3'} (not an SQLite database)" in err[0]
    assert (confdir / "keys.sqlite3").read_text() == "someone else's file\n"  # left untouched


def _ed25519_pki(d: Path) -> Path:
    """A CA and a certificate for "server" with Ed25519 keys (what a pki peer signs with)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    d.mkdir()
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()

    def cert(cn: str, public: object, issuer: str, ca: bool) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(public).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(ca_key, None))

    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(cert("test-ca", ca_key.public_key(), "test-ca", True).public_bytes(pem))
    (d / "server.crt").write_bytes(cert("server", key.public_key(), "test-ca", False).public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (d / "server.key").chmod(0o600)
    return d


def test_recycled_peers_get_the_recycled_mode_first_and_other_peers_are_left_alone(confdir: Path) -> None:
    """A PKI-bootstrapped recycled peer next to a plain PSK peer: the store (here under policy
    "rebootstrap", which refuses every bootstrap it has no record of) governs only the recycled one."""
    from hybridkex.protocol.auth import AuthMode
    from hybridkex.tunnel.material import PeerRecycledAuthenticator, load_channel_material

    pki = _ed25519_pki(confdir / "ed-pki")
    (confdir / "tunnel.toml").write_text(
        TOP + f'[[peers]]\nidentity = "client-a"\nmode = "recycled"\nbootstrap = "pki"\ncert = "{pki / "server.crt"}"\n'
        f'key = "{pki / "server.key"}"\nca = "{pki / "ca.crt"}"\n\n'
        '[[peers]]\nidentity = "client-b"\nmode = "psk"\npsk_file = "b.psk"\n\n'
        + NO_QKD + '[recycle]\nstore = "state/keys.sqlite3"\npolicy = "rebootstrap"\n')
    cfg = load_config("server", "tunnel.toml")
    assert [(p.mode, p.bootstrap) for p in cfg.peers] == [("recycled", "pki"), ("psk", None)]
    assert cfg.recycle is not None and cfg.recycle.store == confdir / "state" / "keys.sqlite3"
    material = load_channel_material(cfg, kme=False)
    try:
        recycled, *bootstraps = material.authenticators
        assert isinstance(recycled, PeerRecycledAuthenticator) and recycled.policy.bootstrap == "rebootstrap"
        assert [a.mode for a in bootstraps] == [AuthMode.PKI_ED25519, AuthMode.PSK]
        assert oct((confdir / "state" / "keys.sqlite3").stat().st_mode & 0o777) == "0o600"  # created at startup
        # client-a: recycled, and its bootstrap refused until an operator arms it (policy rebootstrap)
        assert recycled.permits(AuthMode.RECYCLED, "server", "client-a")
        assert not recycled.permits(AuthMode.PKI_ED25519, "server", "client-a")
        assert recycled.offer("server", "client-a") is not None
        # client-b: never offered or accepted a recycled key; its PSK is not the store's business
        assert not recycled.permits(AuthMode.RECYCLED, "server", "client-b")
        assert recycled.permits(AuthMode.PSK, "server", "client-b")
        assert recycled.offer("server", "client-b") is None
        assert recycled.accept("server", "client-b", (bytes(16),)) is None
    finally:
        material.close()
