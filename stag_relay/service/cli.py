"""Command line: ``stag-relay`` / ``python -m stag_relay``.

Exit status: 0 after a clean shutdown (or a good --check-config), 2 for bad
configuration or usage (systemd's RestartPreventExitStatus=2: restarting will not
fix it), 1 when the relay cannot run (port taken), 130 on a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

import attrs
import structlog
import trio

from stag_relay import __version__
from stag_relay.service.config import Config, ConfigError, available_cpus, dump_config, load_config
from stag_relay.service.logs import configure_logging
from stag_relay.service.relay import Relay, default_relay_id
from stag_relay.service.supervisor import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Reload,
    Supervisor,
)
from stag_relay.service.systemd import Notifier
from stag_relay.service.workers import (
    WorkerRole,
    check_port_free,
    drain_when_orphaned,
    leave_orphaned,
)

# EXIT_OK, EXIT_FAILURE and EXIT_INTERRUPTED are the supervisor's: one process exit
# status whichever mode runs. Bad configuration: restarting will not fix it.
EXIT_CONFIG: Final = 2

log = structlog.get_logger("stag_relay")


@attrs.frozen
class Tool:
    """A subcommand beside the relay: ``module`` has ``configure_parser(parser)`` and
    ``run(args) -> int``; ``needs`` are the distributions of the ``tools`` extra it imports."""

    module: str
    help: str
    needs: tuple[str, ...] = ()


# Imported only when run: the relay itself loads none of them, nor what they need.
# ``help`` is the first line of each module's docstring (checked by the tests).
TOOLS: Final[dict[str, Tool]] = {
    "spool": Tool(
        "stag_relay.service.spoolcmd",
        "Inspect the delivery spool: stats, dead letters, and putting them back in line.",
    ),
    "loadgen": Tool(
        "stag_relay.tools.loadgen",
        "Load generator: N WebSocket connections streaming StreamKit packets to a relay.",
        ("websockets", "rich"),
    ),
    "sink": Tool(
        "stag_relay.tools.sink",
        "Local STAG stand-in: accepts the relay's batches like STAG and shows what arrives.",
        ("rich",),
    ),
    "demo": Tool(
        "stag_relay.tools.demo",
        "Demo: a relay, a local STAG stand-in and a load generator, with one live table.",
        ("httpx", "rich", "websockets"),
    ),
}
TOOLS_INSTALL: Final = "pip install 'stag-relay[tools]'"


def missing_tools_extra(name: str) -> str | None:
    """What to tell the user when tool ``name`` cannot run for want of the ``tools`` extra."""
    missing = []
    for distribution in TOOLS[name].needs:
        try:
            importlib.import_module(distribution)
        except ImportError:
            missing.append(distribution)
    if not missing:
        return None
    return (
        f"stag-relay {name} needs {', '.join(missing)}, from the optional 'tools' extra "
        f"the relay itself does without; install it with: {TOOLS_INSTALL}"
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``command``, that tool's own options too (it is imported)."""
    parser = argparse.ArgumentParser(
        prog="stag-relay",
        description="Relay StreamKit packets from AR/VR clients (WebSocket) to STAG as batched "
        "spatial events.",
        epilog="Configuration: --config PATH, else $RELAY_CONFIG, else ./relay.yaml, else "
        "/etc/stag-relay/relay.yaml; every key can be set as RELAY_<SECTION>_<KEY>.",
    )
    parser.add_argument("--version", action="version", version=f"stag-relay {__version__}")
    parser.add_argument("--config", metavar="PATH", help="YAML configuration file")
    parser.add_argument("--host", help="address to listen on (server.host)")
    parser.add_argument("--port", help="port to listen on (server.port)")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="log.level"
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="print the effective configuration (secrets masked) and exit 0, or 2 if invalid",
    )
    if TOOLS:
        commands = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, tool in TOOLS.items():
            # Without its options a tool's own --help would be taken for the relay's.
            sub = commands.add_parser(
                name, help=tool.help, description=tool.help, add_help=name == command
            )
            if name == command:
                importlib.import_module(tool.module).configure_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # First which tool, if any, without importing one; then its options.
    known, _ = build_parser().parse_known_args(argv)
    command: str | None = getattr(known, "command", None)
    if command is not None:
        problem = missing_tools_extra(command)
        if problem is not None:
            print(f"stag-relay: {problem}", file=sys.stderr)
            return EXIT_CONFIG
    args = build_parser(command).parse_args(argv)
    if command is not None:
        code: int = importlib.import_module(TOOLS[command].module).run(args)
        return code
    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.log_level is not None:
        overrides["log.level"] = args.log_level
    try:
        # Set by a supervisor for its workers (server.workers > 1); None when alone.
        role = WorkerRole.from_environ(os.environ)
    except ValueError as exc:
        print(f"stag-relay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    worker = role.index if role is not None else None
    try:
        loaded = load_config(config_path=args.config, environ=os.environ, overrides=overrides)
    except ConfigError as exc:
        print(f"stag-relay: invalid configuration\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    config = loaded.config
    if args.check_config:
        print(f"# configuration from {loaded.source or 'defaults only'}")
        print(dump_config(config), end="")
        return EXIT_OK
    configure_logging(config.log.level, config.log.format, worker=worker)
    if loaded.source and role is None:
        log.info("configuration loaded", source=loaded.source)

    def reload_config() -> tuple[str, Config | None]:
        """SIGHUP: re-read the configuration, apply what can change while running."""
        try:
            new = load_config(config_path=args.config, environ=os.environ, overrides=overrides)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration", problems=exc.problems)
            return "reload failed: configuration invalid, see the log", None
        configure_logging(new.config.log.level, new.config.log.format, worker=worker)
        # A worker's file is the supervisor's: it has already warned about the rest.
        restart_needed = _changed_keys(config, new.config) - {"log.level", "log.format"}
        if restart_needed:
            log.warning(
                "reloaded; these settings change only on restart", keys=sorted(restart_needed)
            )
        log.info("configuration reloaded", source=new.source, log_level=new.config.log.level)
        return "configuration reloaded", new.config

    def reload() -> str:
        return reload_config()[0]

    try:
        if role is None and config.server.workers > 1:
            return _supervise(config, reload_config)
        trio.run(serve, config, reload, role)
    except OSError as exc:
        log.error(
            "cannot listen",
            host=config.server.host,
            port=config.server.port,
            error=str(exc),
            fix="choose another server.port or stop what holds it",
        )
        return EXIT_FAILURE
    return EXIT_OK


def _supervise(config: Config, reload: Reload) -> int:
    """server.workers > 1: this process becomes the supervisor of that many relays."""
    # The port is checked here, where "in use" is one clear error, and fixed for all
    # workers (port 0 would give each worker a port of its own).
    port = check_port_free(config.server.host, config.server.port)
    server = config.server
    if server.workers > available_cpus():
        log.warning(
            "more workers than CPUs: they compete for the same cores",
            workers=server.workers,
            cpus=available_cpus(),
            fix="set server.workers to auto, or at most the number of CPUs",
        )
    stag = config.stag
    # One relay to STAG, however many processes: the workers share one id.
    config = attrs.evolve(
        config,
        server=attrs.evolve(server, port=port),
        stag=attrs.evolve(stag, relay_id=stag.relay_id or default_relay_id()),
    )
    try:
        supervisor = Supervisor(config, notifier=Notifier.from_environ(), reload=reload)
    except OSError as exc:
        log.error(
            "cannot create the workers' shared directory",
            error=str(exc),
            fix="give the relay a writable temporary directory ($TMPDIR, or /tmp)",
        )
        return EXIT_FAILURE
    log.info("starting workers", workers=config.server.workers, port=port)
    return trio.run(supervisor.run)


# Allocations between young collections (CPython's default is 700). Every packet makes
# a few short-lived objects; at 12,000 packets/s the default collects every few ms.
_GC_YOUNG_THRESHOLD: Final = 20_000


def settle_garbage_collector() -> None:
    """After start-up: move what start-up made (modules, configuration, ~100k objects)
    out of the collector's reach and collect the young generation less often.

    The relay's full collections pause it for tens of milliseconds, straight into
    the latency of the packets waiting meanwhile: in the paced benchmark they made
    its p99 (docs/performance.md). Cycles still get collected, only less often.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, middle, old)


def _changed_keys(old: Config, new: Config) -> set[str]:
    changed = set()
    for section in attrs.fields(Config):
        before, after = getattr(old, section.name), getattr(new, section.name)
        for field in attrs.fields(type(before)):
            if getattr(before, field.name) != getattr(after, field.name):
                changed.add(f"{section.name}.{field.name}")
    return changed


async def serve(
    config: Config, reload: Callable[[], str] | None = None, role: WorkerRole | None = None
) -> None:
    """Run a relay until SIGTERM/SIGINT has drained it; SIGHUP calls ``reload``."""
    relay = Relay(config, notifier=Notifier.from_environ(), worker=role)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        # Bound outside any nursery so "address in use" reaches main() as a plain OSError.
        listeners = await relay.listen()
        settle_garbage_collector()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, relay, reload)
            if role is not None:
                nursery.start_soon(drain_when_orphaned, role.supervisor_pid, relay.shut_down)
            await relay.run(listeners)
            nursery.cancel_scope.cancel()
    relay.notifier.close()
    if role is not None and os.getppid() != role.supervisor_pid:
        leave_orphaned(role)


async def _watch_signals(
    signals: AsyncIterator[int], relay: Relay, reload: Callable[[], str] | None
) -> None:
    draining = False
    async for signum in signals:
        if signum == signal.SIGHUP:
            # Without this SIGHUP would end the relay, and systemd counts that as a
            # clean exit: `systemctl reload` would stop it for good.
            if not draining and reload is not None:
                relay.notifier.reloading()
                outcomes = [reload(), relay.reload_keys(), relay.reload_tls()]
                relay.notifier.ready("; ".join(text for text in outcomes if text is not None))
            continue
        if not draining:
            draining = True
            log.info("signal received, draining", signal=signal.Signals(signum).name)
            relay.shut_down()
        elif signum == signal.SIGINT:
            log.warning("second interrupt, exiting at once")
            os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
