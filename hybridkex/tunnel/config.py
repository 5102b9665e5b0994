"""Tunnel configuration: a TOML file and command-line flags become one frozen, validated object.

Everything a user can get wrong is checked here, at startup (and again on every SIGHUP reload),
and reported as one :class:`~hybridkex.exceptions.ConfigurationError` whose message names the
source and the field, e.g. ``config tunnel.toml: peers[1].psk_file: file not found: /x/y`` or
``option --max-connections (limits.max_connections): expected an integer, got 'ten'``.  Unknown
keys are errors (a typo must not silently fall back to a default).  Relative paths in a file are
resolved against the file's directory, relative paths in flags against the working directory.

The schema (every key, type and default) is documented in ``docs/tunnel.md``; :data:`FLAGS` is the
single table that maps command-line flags to configuration keys.  The objects built here are
defined in :mod:`hybridkex.tunnel._model` and importable from this module.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

from ..exceptions import ConfigurationError, HybridKEXError
from ..protocol import suite_kem
from ..suites import SUITES, get_suite, unknown_suite
from ._model import (
    DEFAULT_METRICS_LISTEN,
    DEFAULT_SUITES,
    KEY_BUDGETS,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_IDENTITY_BYTES,
    PEER_MODES,
    QKD_MODES,
    Address,
    ConfigWarning,
    HealthConfig,
    KeyBudget,
    KMEConfig,
    LimitsConfig,
    LogFormat,
    LoggingConfig,
    LogLevel,
    MetricsConfig,
    PeerConfig,
    PolicyConfig,
    QKDMode,
    Role,
    TimeoutsConfig,
    TunnelConfig,
)
from ._recycle import recycle_table, recycled_peer
from ._state import StateConfig, state_table
from ._table import MISSING, Table, describe

__all__ = [
    "FLAGS",
    "Address",
    "ConfigWarning",
    "Flag",
    "HealthConfig",
    "KMEConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "Overrides",
    "PeerConfig",
    "PolicyConfig",
    "Role",
    "TimeoutsConfig",
    "TunnelConfig",
    "load_config",
    "parse_address",
]


# --- command-line flags ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flag:
    """One command-line flag and the configuration key it overrides."""

    flag: str
    key: str
    kind: Literal["str", "int", "float", "bool", "list", "peer"]
    metavar: str
    help: str


#: Every command-line flag of ``hybridkex tunnel server|client`` (besides --config/--check-config).
FLAGS: Final[tuple[Flag, ...]] = (
    Flag("--listen", "listen", "str", "ADDR", "address to accept connections on, HOST:PORT"),
    Flag("--target", "target", "str", "ADDR", "address to forward connections to, HOST:PORT"),
    Flag("--identity", "identity", "str", "NAME", "this side's identity"),
    Flag("--workers", "workers", "int", "N", "N worker processes on one listening port (SO_REUSEPORT)"),
    Flag("--peer", "peers", "peer", "NAME=PSK_FILE",
         "a peer authenticated by a pre-shared key file (repeatable; replaces the file's [[peers]])"),
    Flag("--target-identity", "target_identity", "str", "NAME",
         "client: identity of the tunnel server at --target (default: the only peer)"),
    Flag("--kme-url", "kme.url", "str", "URL", "this side's ETSI GS QKD 014 KME (https://...)"),
    Flag("--kme-sae-id", "kme.sae_id", "str", "ID", "this side's SAE ID at its KME"),
    Flag("--kme-cert", "kme.cert", "str", "FILE", "client certificate for the KME (PEM)"),
    Flag("--kme-key", "kme.key", "str", "FILE", "private key of --kme-cert (PEM)"),
    Flag("--kme-ca", "kme.ca", "str", "FILE", "CA certificate(s) that sign the KME's certificate (PEM)"),
    Flag("--kme-retries", "kme.retries", "int", "N",
         "extra attempts after a failed KME connection or a 503 (default 5: ~1.5-3 s of outage)"),
    Flag("--kme-embedded", "kme.embedded", "bool", "",
         "reserved, refused by the tunnel: an in-process simulated KME cannot serve a peer in another "
         "process; run 'hybridkex kme' and pass --kme-url"),
    Flag("--suite", "policy.suites", "list", "SUITE", "allowed suite, most preferred first (repeatable)"),
    Flag("--qkd", "policy.qkd", "str", "MODE", "QKD policy: required, optional or disabled"),
    Flag("--key-budget", "policy.key_budget", "str", "BUDGET", "QKD key budget: fresh or epoch"),
    Flag("--handshake-timeout", "timeouts.handshake", "float", "SECONDS", "handshake deadline"),
    Flag("--idle-timeout", "timeouts.idle", "float", "SECONDS", "close connections idle this long (0: never)"),
    Flag("--drain-timeout", "timeouts.drain", "float", "SECONDS", "SIGTERM: how long open connections may finish"),
    Flag("--connect-timeout", "timeouts.connect", "float", "SECONDS", "deadline for connecting to --target"),
    Flag("--max-connections", "limits.max_connections", "int", "N", "refuse connections beyond N open ones"),
    Flag("--handshake-rate", "limits.handshake_rate", "float", "PER_SECOND",
         "handshakes per second per authenticated peer (0: unlimited)"),
    Flag("--handshake-burst", "limits.handshake_burst", "int", "N", "handshake burst per authenticated peer"),
    Flag("--address-rate", "limits.address_rate", "float", "PER_SECOND",
         "in-flight or failed handshakes per second per remote address, before authentication (0: unlimited)"),
    Flag("--address-burst", "limits.address_burst", "int", "N", "burst of --address-rate"),
    Flag("--log-format", "logging.format", "str", "FORMAT", "text or json"),
    Flag("--log-level", "logging.level", "str", "LEVEL", "debug, info, warning or error"),
    Flag("--metrics", "metrics.enabled", "bool", "", "serve Prometheus metrics at /metrics"),
    Flag("--metrics-listen", "metrics.listen", "str", "ADDR",
         f"address of the metrics/health endpoint (default {DEFAULT_METRICS_LISTEN})"),
    Flag("--health", "health.enabled", "bool", "", "serve a health check at /healthz"),
)


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values given on the command line: dotted key → value, and dotted key → the flag that set it."""

    values: Mapping[str, Any] = field(default_factory=dict)
    flags: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_namespace(cls, ns: object) -> Overrides:
        """Collect the :data:`FLAGS` set on an argparse namespace (attribute = flag without ``--``)."""
        values: dict[str, Any] = {}
        flags: dict[str, str] = {}
        for f in FLAGS:
            raw = getattr(ns, _dest(f.flag), None)
            if raw is None or raw is False or raw == []:
                continue
            if f.kind == "int":
                value: Any = _parse_number(raw, int, f)
            elif f.kind == "float":
                value = _parse_number(raw, float, f)
            elif f.kind == "peer":
                value = [_parse_peer_flag(item, f) for item in raw]
            else:
                value = raw
            values[f.key] = value
            flags[f.key] = f.flag
        return cls(values, flags)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


_N = TypeVar("_N", int, float)


def _parse_number(raw: str, kind: Callable[[str], _N], f: Flag) -> _N:
    try:
        return kind(raw)
    except ValueError:
        word = "an integer" if kind is int else "a number"
        raise ConfigurationError(f"expected {word}, got {raw!r}", field=f"option {f.flag} ({f.key})") from None


def _parse_peer_flag(raw: str, f: Flag) -> dict[str, str]:
    name, sep, path = raw.partition("=")
    if not sep or not name or not path:
        raise ConfigurationError(f"expected NAME=PSK_FILE, got {raw!r}", field=f"option {f.flag}")
    return {"identity": name, "mode": "psk", "psk_file": path}


# --- loading --------------------------------------------------------------------------------------


def load_config(role: Role, path: str | os.PathLike[str] | None = None,
                overrides: Overrides | None = None, *,
                check: Callable[[TunnelConfig], None] | None = None) -> TunnelConfig:
    """Read ``path`` (TOML, optional), apply ``overrides`` (flags win) and validate everything.

    ``check`` then validates what the configuration names (the channel's key files: see
    :func:`hybridkex.tunnel.material.check_channel_config`); its errors are attributed to the file
    or flag like the schema's.  Raises :class:`ConfigurationError` with a one-line message naming
    the source and the field.
    """
    overrides = overrides or Overrides()
    raw: dict[str, Any] = {}
    file_label: str | None = None
    base = Path.cwd()
    source: Path | None = None
    if path is not None:
        file_label = os.fspath(path)
        source = Path(path).resolve()
        base = source.parent
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigurationError(f"config {file_label}: cannot read: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"config {file_label}: invalid TOML: {exc}") from None
        except UnicodeDecodeError as exc:  # tomllib decodes the whole file first; TOML is UTF-8
            raise ConfigurationError(f"config {file_label}: not UTF-8 text (byte {exc.start}); save the file "
                                     "as UTF-8") from None
    for key, value in overrides.values.items():
        _set_dotted(raw, key, value)
    try:
        config = _Validator(role, raw, file_base=base, cwd=Path.cwd(), overrides=overrides, source=source).build()
        if check is not None:
            check(config)
        return config
    except ConfigurationError as exc:
        raise _attribute(exc, overrides, file_label) from None


def _attribute(exc: ConfigurationError, overrides: Overrides, file_label: str | None) -> ConfigurationError:
    """Prefix the error with where the faulty value came from: a flag, the file, or neither."""
    name = exc.field or ""
    message = str(exc)
    text = message
    for key, flag in overrides.flags.items():
        if name and (name == key or name.startswith((key + ".", key + "["))):
            detail = message[len(name) + 2:] if message.startswith(name + ": ") else message
            text = f"option {flag} ({name}): {detail}"
            break
    else:
        if file_label is not None:
            text = f"config {file_label}: {message}"
    out = ConfigurationError(text)
    out.field = name or None
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


# --- validation -----------------------------------------------------------------------------------

def parse_address(text: str, *, field_name: str, allow_any_port: bool = False) -> Address:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT``; port 0 only where ``allow_any_port``."""
    host: str
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1:]
        if end < 0 or not rest.startswith(":"):
            raise ConfigurationError(f"expected [IPv6]:PORT, got {text!r}", field=field_name)
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigurationError(f"expected HOST:PORT, got {text!r}", field=field_name)
        if ":" in host:
            raise ConfigurationError(f"write IPv6 addresses as [ADDR]:PORT, got {text!r}", field=field_name)
    if not host:
        raise ConfigurationError(f"missing host in {text!r} (use 0.0.0.0 or [::] for every interface)",
                                 field=field_name)
    if not port_text.isdigit():
        raise ConfigurationError(f"port must be a number, got {text!r}", field=field_name)
    port = int(port_text)
    lowest = 0 if allow_any_port else 1
    if not lowest <= port <= 65535:
        raise ConfigurationError(f"port must be between {lowest} and 65535, got {port}", field=field_name)
    return Address(host, port)


def _identity(value: str, field_name: str) -> str:
    if len(value.encode("utf-8")) > MAX_IDENTITY_BYTES:
        raise ConfigurationError(f"must be at most {MAX_IDENTITY_BYTES} bytes", field=field_name)
    if any(not (0x21 <= ord(c) <= 0x7E) for c in value):
        raise ConfigurationError("must be printable ASCII without spaces", field=field_name)
    return value


class _Validator:
    def __init__(self, role: Role, raw: dict[str, Any], *, file_base: Path, cwd: Path, overrides: Overrides,
                 source: Path | None) -> None:
        self.role = role
        self.raw = raw
        self.file_base = file_base
        self.cwd = cwd
        self.overrides = overrides
        self.source = source
        self.warnings: list[ConfigWarning] = []

    # Paths from flags resolve against the working directory, paths from the file against its directory.
    def _base_for(self, key: str) -> Path:
        for k in self.overrides.flags:
            if key == k or key.startswith((k + ".", k + "[")):
                return self.cwd
        return self.file_base

    def path(self, table: Table, key: str, *, required: bool,
             sensitive: Literal["psk", "key", ""] = "") -> Path | None:
        value = table.string(key, MISSING if required else None)
        if value is None:
            return None
        name = table.name(key)
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = self._base_for(name) / p
        try:
            st = p.stat()
        except FileNotFoundError:
            raise ConfigurationError(f"file not found: {p}", field=name) from None
        except OSError as exc:
            raise ConfigurationError(f"cannot access {p}: {exc.strerror or exc}", field=name) from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"not a regular file: {p}", field=name)
        if not os.access(p, os.R_OK):
            raise ConfigurationError(f"file not readable by this process: {p}", field=name)
        if sensitive and os.name == "posix" and st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            if sensitive == "psk":
                # A PSK is the whole authentication secret: refuse, as ssh does for private keys.
                raise ConfigurationError(
                    f"{p} is accessible by group/others (mode {mode:04o}); a key file must be private: "
                    f"run chmod 600 {p}", field=name)
            self.warnings.append(ConfigWarning(name, f"private key {p} is accessible by group/others "
                                                     f"(mode {mode:04o}); consider chmod 600"))
        if sensitive == "psk" and st.st_size == 0:
            raise ConfigurationError(f"key file is empty: {p}", field=name)
        return p

    def build(self) -> TunnelConfig:
        top = Table(self.raw, "", "")
        listen = parse_address(top.string("listen", hint="set listen = \"HOST:PORT\" or pass --listen"),
                               field_name="listen", allow_any_port=True)
        target = parse_address(top.string("target", hint="set target = \"HOST:PORT\" or pass --target"),
                               field_name="target")
        identity = _identity(top.string("identity", hint="set identity = \"NAME\" or pass --identity"), "identity")
        if self.role == "client" and not listen.is_loopback:
            self.warnings.append(ConfigWarning(
                "listen", f"the client side accepts unencrypted connections on {listen}, which is not loopback"))

        policy = self.policy(top)
        peers = self.peers(top, policy)
        target_identity: str | None = None
        if self.role == "client":
            target_identity = top.typed("target_identity", str, None)
            if target_identity is None:
                if len(peers) > 1:
                    raise ConfigurationError(
                        f"missing; {len(peers)} peers are configured, so name the tunnel server at target",
                        field="target_identity")
                target_identity = peers[0].identity
            elif not any(p.identity == target_identity for p in peers):
                raise ConfigurationError(f"no peer with identity {target_identity!r} in peers",
                                         field="target_identity")
        else:
            top.forbid("target_identity", "on the server side (it accepts every configured peer)")
        kme = self.kme(top)
        if policy.qkd != "disabled" and kme is None:
            raise ConfigurationError(
                f'"{policy.qkd}" needs a [kme] table; configure a KME or set '
                'policy.qkd = "disabled"', field="policy.qkd")
        if policy.qkd != "disabled":
            for i, p in enumerate(peers):
                if p.sae_id is None:
                    raise ConfigurationError(f'missing; policy.qkd = "{policy.qkd}" needs each peer\'s SAE ID',
                                             field=f"peers[{i}].sae_id")
        timeouts = self.timeouts(top)
        limits = self.limits(top)
        logging_cfg = self.logging(top)
        metrics, health = self.metrics(top)
        recycle = recycle_table(self, top, peers, self.warnings, ConfigWarning)
        state = state_table(self, top, policy.steady)
        workers = self.workers(top, policy, state)
        return TunnelConfig(
            role=self.role, listen=listen, target=target, identity=identity, peers=peers,
            target_identity=target_identity, kme=kme, policy=policy, timeouts=timeouts, limits=limits,
            logging=logging_cfg, metrics=metrics, health=health, recycle=recycle, state=state, workers=workers,
            source=self.source,
            warnings=tuple(self.warnings),
        )

    def policy(self, top: Table) -> PolicyConfig:
        t = top.table("policy")
        qkd = cast(QKDMode, t.choice("qkd", QKD_MODES, "required"))
        raw_suites = t.typed("suites", list, None)
        if raw_suites is None:
            suites = DEFAULT_SUITES[qkd]
        else:
            if not raw_suites:
                raise ConfigurationError("must list at least one suite", field="policy.suites")
            names: list[str] = []
            for i, name in enumerate(raw_suites):
                fname = f"policy.suites[{i}]"
                if not isinstance(name, str):
                    raise ConfigurationError(f"expected a suite name, got {describe(name)}", field=fname)
                if name not in SUITES:
                    raise ConfigurationError(unknown_suite(name), field=fname)
                if name in names:
                    raise ConfigurationError(f"suite {name!r} is listed twice", field=fname)
                suite = get_suite(name)
                if qkd == "required" and not suite.qkd:
                    raise ConfigurationError(f'suite {name!r} has no QKD component but policy.qkd = "required"',
                                             field=fname)
                if qkd == "disabled" and suite.qkd:
                    raise ConfigurationError(f'suite {name!r} needs a QKD key but policy.qkd = "disabled"',
                                             field=fname)
                try:
                    suite_kem(suite)  # loads the KEM and checks it fits the handshake's wire format
                except HybridKEXError as exc:
                    raise ConfigurationError(f"suite {name!r} is not available here: {exc}", field=fname) from None
                names.append(name)
            suites = tuple(names)
        budget = cast(KeyBudget, t.choice("key_budget", KEY_BUDGETS, "fresh"))
        return PolicyConfig(suites=suites, qkd=qkd, key_budget=budget, steady=t.boolean("steady", True))

    def peers(self, top: Table, policy: PolicyConfig) -> tuple[PeerConfig, ...]:
        raw = top.typed("peers", list, [])
        if not raw:
            raise ConfigurationError(
                "no peers configured; add a [[peers]] table (or --peer NAME=PSK_FILE) for each peer "
                + ("allowed to connect" if self.role == "server" else "(the tunnel server)"), field="peers")
        out: list[PeerConfig] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(raw):
            t = Table(item, f"peers[{i}]", "peers")
            ident = _identity(t.string("identity"), t.name("identity"))
            if ident in seen:
                raise ConfigurationError(f"duplicate identity {ident!r} (also peers[{seen[ident]}])",
                                         field=t.name("identity"))
            seen[ident] = i
            mode = t.choice("mode", PEER_MODES, "psk") if t.has("mode") else None
            if mode is None:
                raise ConfigurationError('missing required key; set mode = "psk", "pki" or "recycled"',
                                         field=t.name("mode"))
            if mode != "recycled":
                t.forbid("bootstrap", f'with mode = "{mode}" (it belongs to mode = "recycled")')
            sae_id = t.string("sae_id", None)
            peer = _PEER_MODE_VALIDATORS[mode](self, t, ident, sae_id)
            out.append(peer)
        return tuple(out)

    def psk_peer(self, t: Table, ident: str, sae_id: str | None) -> PeerConfig:
        for k in ("cert", "key", "ca"):
            t.forbid(k, 'with mode = "psk" (certificates belong to mode = "pki")')
        psk = self.path(t, "psk_file", required=True, sensitive="psk")
        return PeerConfig(identity=ident, mode="psk", psk_file=psk, sae_id=sae_id)

    def pki_peer(self, t: Table, ident: str, sae_id: str | None) -> PeerConfig:
        t.forbid("psk_file", 'with mode = "pki" (a key file belongs to mode = "psk")')
        cert = self.path(t, "cert", required=True)
        key = self.path(t, "key", required=True, sensitive="key")
        ca = self.path(t, "ca", required=True)
        return PeerConfig(identity=ident, mode="pki", cert=cert, key=key, ca=ca, sae_id=sae_id)

    def kme(self, top: Table) -> KMEConfig | None:
        if not top.has("kme"):
            return None
        t = top.table("kme")
        embedded = t.boolean("embedded", False)
        if embedded:
            for k in ("url", "cert", "key", "ca"):
                t.forbid(k, "with embedded = true (the embedded KME needs no endpoint)")
            sae_id = t.string("sae_id", None)
            return KMEConfig(embedded=True, sae_id=sae_id)
        url = t.string("url", hint="set url = \"https://KME:PORT\" (a real KME, or `hybridkex kme`)")
        if not url.startswith("https://") or len(url) <= len("https://"):
            raise ConfigurationError(f"must be an https:// URL (ETSI GS QKD 014 uses mutual TLS), got {url!r}",
                                     field="kme.url")
        sae_id = t.string("sae_id", hint="set sae_id = \"ID\": this side's SAE ID at its KME (kme.cert's CN)")
        cert = self.path(t, "cert", required=True)
        key = self.path(t, "key", required=True, sensitive="key")
        ca = self.path(t, "ca", required=True)
        d = KMEConfig()
        retries = t.integer("retries", d.retries, minimum=0, maximum=1000)
        backoff = t.number("backoff", d.backoff, minimum=0.001, maximum=60, allow_zero=True)
        max_backoff = t.number("max_backoff", max(d.max_backoff, backoff), minimum=0.001, maximum=600,
                               allow_zero=True)
        if max_backoff < backoff:
            raise ConfigurationError(f"must be >= kme.backoff ({backoff:g}), got {max_backoff:g}",
                                     field="kme.max_backoff")
        return KMEConfig(url=url, sae_id=sae_id, cert=cert, key=key, ca=ca, retries=retries, backoff=backoff,
                         max_backoff=max_backoff)

    def workers(self, top: Table, policy: PolicyConfig, state: StateConfig | None) -> int:
        n = top.integer("workers", 1, minimum=1, maximum=256)
        # A client worker needs no [state]: its steady-state ticket lives in its own memory (never shared,
        # never written to a file), its announced QKD keys are reserved by itself at the KME (which hands
        # each key out once), and the anti-replay that must be shared is the server's.
        if n > 1 and self.role == "server" and policy.steady and state is None:
            # Fail closed: each worker would keep its own record of spent steady-state counters and key IDs.
            raise ConfigurationError(
                f"{n} workers need a [state] table to share steady-state anti-replay; add [state] with "
                'url = "/var/lib/hybridkex/state.sqlite3" (one host) or a postgresql:// URL, '
                "or set policy.steady = false", field="workers")
        return n

    def timeouts(self, top: Table) -> TimeoutsConfig:
        t = top.table("timeouts")
        d = TimeoutsConfig()
        out = TimeoutsConfig(
            handshake=t.number("handshake", d.handshake, minimum=0.001, maximum=3600),
            idle=t.number("idle", d.idle, minimum=0.001, maximum=7 * 86400, allow_zero=True),
            drain=t.number("drain", d.drain, minimum=0, maximum=86400),
            connect=t.number("connect", d.connect, minimum=0.001, maximum=3600),
        )
        return out

    def limits(self, top: Table) -> LimitsConfig:
        t = top.table("limits")
        d = LimitsConfig() if self.role == "server" else LimitsConfig(handshake_rate=0.0, address_rate=0.0)
        rate: dict[str, Any] = {"minimum": 0.0001, "maximum": 1e6, "allow_zero": True}
        out = LimitsConfig(
            max_connections=t.integer("max_connections", d.max_connections, minimum=1, maximum=1_000_000),
            handshake_rate=t.number("handshake_rate", d.handshake_rate, **rate),
            handshake_burst=t.integer("handshake_burst", d.handshake_burst, minimum=1, maximum=1_000_000),
            address_rate=t.number("address_rate", d.address_rate, **rate),
            address_burst=t.integer("address_burst", d.address_burst, minimum=1, maximum=1_000_000),
        )
        return out

    def logging(self, top: Table) -> LoggingConfig:
        t = top.table("logging")
        out = LoggingConfig(format=cast(LogFormat, t.choice("format", LOG_FORMATS, "text")),
                            level=cast(LogLevel, t.choice("level", LOG_LEVELS, "info")))
        return out

    def metrics(self, top: Table) -> tuple[MetricsConfig, HealthConfig]:
        t = top.table("metrics")
        enabled = t.boolean("enabled", False)
        listen = parse_address(t.string("listen", DEFAULT_METRICS_LISTEN), field_name="metrics.listen",
                               allow_any_port=True)
        h = top.table("health")
        health = HealthConfig(enabled=h.boolean("enabled", False))
        if (enabled or health.enabled) and not listen.is_loopback:
            self.warnings.append(ConfigWarning(
                "metrics.listen", f"metrics/health endpoint on {listen} is reachable beyond this host"))
        return MetricsConfig(enabled=enabled, listen=listen), health


#: Peer authentication modes and their validators; a new mode adds an entry here and to :data:`PEER_MODES`.
_PEER_MODE_VALIDATORS: Final[dict[str, Callable[[_Validator, Table, str, str | None], PeerConfig]]] = {
    "psk": _Validator.psk_peer,
    "pki": _Validator.pki_peer,
    "recycled": recycled_peer,
}
