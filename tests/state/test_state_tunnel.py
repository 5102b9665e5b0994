"""``[state]`` in the tunnel configuration: parsed, checked, and the recycled keys kept in the state."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from statehelpers import PG, SEAL_KEY
from tunnelhelpers import metric, parse_prometheus

from hybridkex import cli, get_suite
from hybridkex.exceptions import ConfigurationError
from hybridkex.io.config import StateReads
from hybridkex.state import open_state
from hybridkex.state.pgkeys import PostgresAuthKeyStore
from hybridkex.steady.derive import SteadyIdentity
from hybridkex.tunnel.config import load_config
from hybridkex.tunnel.material import PeerRecycledAuthenticator, load_channel_material
from hybridkex.tunnel.metrics import TunnelMetrics
from hybridkex.tunnel.secure import HybridChannelFactory

TOP = 'listen = "127.0.0.1:8443"\ntarget = "127.0.0.1:8080"\nidentity = "server"\n'
PEER = '[[peers]]\nidentity = "client-a"\nmode = "recycled"\nbootstrap = "psk"\npsk_file = "a.psk"\n'
NO_QKD = '[policy]\nqkd = "disabled"\n'


@pytest.fixture
def confdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.psk").write_bytes(os.urandom(32))
    (tmp_path / "a.psk").chmod(0o600)
    (tmp_path / "state.key").write_text(SEAL_KEY.hex() + "\n")
    (tmp_path / "state.key").chmod(0o600)
    return tmp_path


def _write(confdir: Path, state: str, extra: str = "") -> Path:
    path = confdir / "tunnel.toml"
    path.write_text(TOP + PEER + NO_QKD + extra + state)
    return path


def test_state_table_is_parsed(confdir: Path) -> None:
    _write(confdir, '[state]\nurl = "shared/state.sqlite3"\nkey_file = "state.key"\n')
    cfg = load_config("server", "tunnel.toml")
    assert cfg.state is not None and cfg.state.url == str(confdir / "shared" / "state.sqlite3")
    assert cfg.state.key_file == confdir / "state.key" and not cfg.state.postgresql
    assert cfg.recycle is not None and cfg.recycle.store is None and cfg.recycle.policy == "bootstrap-once"
    _write(confdir, '[state]\nurl = "postgresql://hkx:pw@db.example/hkx"\n', '[recycle]\npolicy = "rebootstrap"\n')
    cfg = load_config("server", "tunnel.toml")
    assert cfg.state is not None and cfg.state.postgresql and "pw" not in repr(cfg.state)
    assert cfg.recycle is not None and cfg.recycle.policy == "rebootstrap"


@pytest.mark.parametrize(("state", "extra", "message"), [
    ('[state]\nurl = "mysql://db/x"\n', "", "state.url: unknown state backend 'mysql'"),
    ('[state]\n', "", "state.url: missing required key"),
    ('[state]\nurl = "s.sqlite3"\nkey_file = "nope.key"\n', "", "state.key_file: file not found"),
    ('[state]\nurl = "s.sqlite3"\n', '[recycle]\nstore = "keys.sqlite3"\n',
     "recycle.store: not allowed with [state] (the recycled keys are kept in the shared state)"),
    ('[state]\nurl = "s.sqlite3"\nuri = "x"\n', "", "unknown key 'state.uri' (did you mean 'state.url'?)"),
    ('[state]\nurl = "s.sqlite3"\npurge_every = -1\n', "", "state.purge_every: must be 0 or between 0.1 and 86400"),
    # Shorter than the steady state's lifetime (3600 s): a purged ID could be replayed meanwhile.
    ('[state]\nurl = "s.sqlite3"\nspent_older_than = 600\n', "",
     "state.spent_older_than: must be at least steady.lifetime (3600 s)"),
])
def test_bad_state_tables_are_one_line(confdir: Path, state: str, extra: str, message: str) -> None:
    _write(confdir, state, extra)
    with pytest.raises(ConfigurationError) as exc:
        load_config("server", "tunnel.toml")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_purge_settings_are_parsed(confdir: Path) -> None:
    _write(confdir, '[state]\nurl = "s.sqlite3"\n')
    cfg = load_config("server", "tunnel.toml")
    assert cfg.state is not None and (cfg.state.purge_every, cfg.state.spent_older_than) == (600.0, None)
    _write(confdir, '[state]\nurl = "s.sqlite3"\npurge_every = 0\nspent_older_than = 86400\n')
    cfg = load_config("server", "tunnel.toml")
    assert cfg.state is not None and (cfg.state.purge_every, cfg.state.spent_older_than) == (0.0, 86400.0)


def test_a_readable_state_key_is_refused(confdir: Path) -> None:
    (confdir / "state.key").chmod(0o644)
    _write(confdir, '[state]\nurl = "s.sqlite3"\nkey_file = "state.key"\n')
    with pytest.raises(ConfigurationError, match=r"state.key_file: .*chmod 600"):
        load_config("server", "tunnel.toml")


def test_recycled_keys_live_in_a_sqlite_state(confdir: Path) -> None:
    _write(confdir, '[state]\nurl = "state.sqlite3"\n')
    cfg = load_config("server", "tunnel.toml")
    material = load_channel_material(cfg, kme=False)
    try:
        recycled = material.authenticators[0]
        assert isinstance(recycled, PeerRecycledAuthenticator)
        recycled.store.rotate("server", "client-a", used_key_id=None, new_key_id=b"\x01" * 16, new_key=b"\x02" * 32)
    finally:
        material.close()
    with open_state(confdir / "state.sqlite3") as s:  # the state's own file, the keys in it
        assert [k.key_id for k in s.auth_keys().keys("server", "client-a")] == [b"\x01" * 16]


def test_recycled_keys_live_in_a_postgresql_state(confdir: Path, pg: PG) -> None:
    url = pg.new_url()
    _write(confdir, f'[state]\nurl = "{url}"\nkey_file = "state.key"\n')
    material = load_channel_material(load_config("server", "tunnel.toml"), kme=False)
    try:
        recycled = material.authenticators[0]
        assert isinstance(recycled, PeerRecycledAuthenticator) and isinstance(recycled.store, PostgresAuthKeyStore)
        recycled.store.rotate("server", "client-a", used_key_id=None, new_key_id=b"\x01" * 16, new_key=b"\x02" * 32)
    finally:
        material.close()
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert [k.key for k in s.auth_keys().keys("server", "client-a")] == [b"\x02" * 32]


def test_check_config_reports_an_unreachable_state_in_one_line(confdir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    _write(confdir, f'[state]\nurl = "postgresql://hkx:pw@/hkx?host={confdir}"\nkey_file = "state.key"\n')
    code = cli.main(["tunnel", "server", "--config", "tunnel.toml", "--check-config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 10 and len(err) == 1, err
    assert "unreachable" in err[0] and "pw" not in err[0].replace("postgresql://hkx:***@", "")


def test_check_config_creates_no_sqlite_state(confdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(confdir, '[state]\nurl = "state.sqlite3"\n')
    assert cli.main(["tunnel", "server", "--config", "tunnel.toml", "--check-config"]) == 0
    assert not (confdir / "state.sqlite3").exists()



def test_state_read_limits_are_parsed_and_reach_the_server_and_its_metrics(confdir: Path) -> None:
    _write(confdir, '[state]\nurl = "state.sqlite3"\nkey_file = "state.key"\nread_rate = 0\nread_burst = 3\n'
                    'read_address_rate = 1.5\nread_address_burst = 7\nunknown_ttl = 0.5\nunknown_max = 99\n')
    cfg = load_config("server", "tunnel.toml")
    want = StateReads(rate=0, burst=3, address_rate=1.5, address_burst=7, unknown_ttl=0.5, unknown_max=99)
    assert cfg.state is not None and cfg.state.reads == want
    metrics = TunnelMetrics("server")
    factory = HybridChannelFactory(cfg, metrics)
    try:
        server = factory.server
        assert server is not None and server.config.state_reads == want
        steady = server.state.steady
        assert steady is not None and steady.reads is not None
        suite = get_suite("x25519-mlkem768-qkd-hkdfsha256")
        handle = os.urandom(16)
        for source in ["192.0.2.1"] * 9 + ["192.0.2.2"]:  # 7 read, then 2 over the address's burst; 1 read
            identity = SteadyIdentity(os.urandom(16), 1, False, (), ()).encode(os.urandom(32), suite)
            assert steady.claim(identity, suite.tls_cipher, source=source) is None
        for _ in range(4):  # read once, then 3 from the negative cache
            identity = SteadyIdentity(handle, 1, False, (), ()).encode(os.urandom(32), suite)
            steady.claim(identity, suite.tls_cipher)
        metrics.collect()
        metrics.collect()  # counted once, however often it is scraped
        samples = parse_prometheus(metrics.render())
        assert metric(samples, "hybridkex_state_reads_refused_total", reason="rate_limited") == 2
        assert metric(samples, "hybridkex_state_reads_refused_total", reason="unknown_cached") == 3
    finally:
        asyncio.run(factory.aclose())


def test_bad_state_read_limits_are_one_line(confdir: Path) -> None:
    for line, message in (("read_burst = 0", "state.read_burst: must be between 1 and 1000000"),
                          ("unknown_ttl = 0", "state.unknown_ttl: must be between 0.01 and 3600"),
                          ("read_rate = -1", "state.read_rate: must be 0 or between 0.01")):
        _write(confdir, f'[state]\nurl = "s.sqlite3"\n{line}\n')
        with pytest.raises(ConfigurationError) as exc:
            load_config("server", "tunnel.toml")
        assert message in str(exc.value) and "\n" not in str(exc.value)
