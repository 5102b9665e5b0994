"""``hybridkex tunnel server|client``: a quantum-safe tunnel in front of any TCP service.

The server accepts secured connections and forwards them to a plain TCP target; the client accepts
local plain TCP connections and carries them to a tunnel server.  Configuration comes from a TOML
file (``--config``) and/or flags (flags win); see docs/tunnel.md for every key.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any

from ..exceptions import ConfigurationError
from ..tunnel import make_runtime
from ..tunnel.channel import insecure_test_hook_active, resolve_channel_check, resolve_channel_provider
from ..tunnel.config import FLAGS, Overrides, Role, TunnelConfig, load_config
from ..tunnel.logs import configure_logging, set_process_fields
from ..tunnel.supervisor import Supervisor, WorkerSetup
from .exitcodes import exit_status_epilog

HELP = "run a quantum-safe tunnel in front of any TCP service (server or client side)"

_ROLE_HELP = {
    "server": "accept secured connections on --listen and forward them to the TCP service at --target",
    "client": "accept local TCP connections on --listen and carry them securely to the tunnel server at --target",
}


def configure(parser: argparse.ArgumentParser) -> None:
    roles = parser.add_subparsers(dest="role", metavar="ROLE")
    for role in ("server", "client"):
        sub = roles.add_parser(role, help=_ROLE_HELP[role], description=_ROLE_HELP[role],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="signals: SIGTERM drains and stops, SIGHUP reloads --config.\n"
                                      "configuration reference: docs/tunnel.md.\n\n" + exit_status_epilog())
        sub.add_argument("--config", metavar="FILE", help="TOML configuration file (flags override it)")
        sub.add_argument("--check-config", action="store_true",
                         help="validate the configuration, print a summary and exit")
        for f in FLAGS:
            if f.flag == "--target-identity" and role == "server":
                continue  # the server accepts every configured peer
            if f.kind == "bool":
                sub.add_argument(f.flag, action="store_true", default=None, help=f.help)
            elif f.kind in ("list", "peer"):
                sub.add_argument(f.flag, action="append", metavar=f.metavar, help=f.help)
            else:
                sub.add_argument(f.flag, metavar=f.metavar, help=f.help)


def _summary(cfg: TunnelConfig) -> str:
    return (f"hybridkex: configuration OK: tunnel {cfg.role} listen={cfg.listen} target={cfg.target} "
            f"identity={cfg.identity} peers={len(cfg.peers)} suites={','.join(cfg.policy.suites)} "
            f"qkd={cfg.policy.qkd}")


def run(args: argparse.Namespace) -> int:
    role: Role | None = args.role
    if role is None:
        print("usage: hybridkex tunnel {server,client} [options]; see 'hybridkex tunnel server --help'",
              file=sys.stderr)
        return 2
    insecure_test_hook_active()  # refuses the test hook outside the test suite, before anything else
    provider, insecure = resolve_channel_provider()
    check = resolve_channel_check()
    overrides = Overrides.from_namespace(args)
    config_path: str | None = args.config

    def loader() -> TunnelConfig:
        # --check-config, startup and every SIGHUP read and check the same things, key files included.
        return load_config(role, config_path, overrides, check=check)

    config = loader()
    if args.check_config:
        for w in config.warnings:
            print(f"hybridkex: warning: {w.field}: {w.message}")
        print(_summary(config))
        return 0

    configure_logging(config.logging.format, config.logging.level)
    worker = WorkerSetup.from_env()
    if worker is not None:  # started by a supervisor (below): serve on its port, metrics to its directory
        worker.bind_to_parent()
        set_process_fields(worker=worker.index, pid=os.getpid())

        def worker_loader() -> TunnelConfig:
            return worker.adapt(loader())

        runtime = make_runtime(worker.adapt(config), provider, loader=worker_loader if config_path else None,
                               insecure=insecure, reuse_port=True, metrics_endpoint=False)
        return _run_loop(runtime.run(ready=worker.ready))
    if config.workers > 1:
        argv = [sys.executable, "-m", "hybridkex", *getattr(args, "argv", ())]
        return asyncio.run(Supervisor(config, loader if config_path else None, argv).run())
    runtime = make_runtime(config, provider, loader=loader if config_path else None, insecure=insecure)
    return _run_loop(runtime.run())


#: Environment variable that picks the tunnel's event loop: ``uvloop`` or ``asyncio``.
EVENT_LOOP_ENV = "HYBRIDKEX_EVENT_LOOP"


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the tunnel on uvloop when it is installed (``pip install 'hybridkex[uvloop]'``: a C
    event loop, about a third less CPU per relayed message), else on asyncio's own loop."""
    wanted = os.environ.get(EVENT_LOOP_ENV, "")
    if wanted not in ("", "uvloop", "asyncio"):
        main.close()
        raise ConfigurationError(f"must be uvloop or asyncio, got {wanted!r}", field=EVENT_LOOP_ENV)
    if wanted != "asyncio":
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - optional extra
        except ImportError:
            if wanted == "uvloop":
                main.close()
                raise ConfigurationError("uvloop is not installed (pip install 'hybridkex[uvloop]')",
                                         field=EVENT_LOOP_ENV) from None
        else:
            result: int = uvloop.run(main)
            return result
    return asyncio.run(main)
