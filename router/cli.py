"""The `headwater` command: serve, print the sample configuration, upgrade the database."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from router import __version__
from router.config import Config, ConfigError, render_sample

log = logging.getLogger("headwater")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headwater", description="Event-driven trigger router and function engine for OpenStack clouds.")
    parser.add_argument("--version", action="version", version=f"headwater {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the API, router, sources and engine in this process")
    serve.add_argument("--config-file", action="append", default=[], metavar="PATH",
                       help="INI configuration file; repeatable, later files win (default: embedded defaults)")
    serve.add_argument("--host", help="override [api] host")
    serve.add_argument("--port", help="override [api] port")
    serve.add_argument("--data-dir", help="override [DEFAULT] data_dir")

    commands.add_parser("config-sample", help="print the documented sample configuration (every option at its default)")
    commands.add_parser("policy-sample", help="print the default policy rules as a YAML policy file ([oslo_policy] policy_file)")

    upgrade = commands.add_parser("db-upgrade", help="apply database migrations and exit")
    upgrade.add_argument("--config-file", action="append", default=[], metavar="PATH")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    overrides = {"api": {"host": getattr(args, "host", None), "port": getattr(args, "port", None)},
                 "DEFAULT": {"data_dir": getattr(args, "data_dir", None)}}
    return Config.load(args.config_file, overrides)


async def _serve(config: Config) -> None:
    from router.app import Headwater, serve

    app = Headwater(config)  # raises ConfigError for an unknown plugin name
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await serve(app)
    except asyncio.CancelledError:
        log.info("headwater stopped")


async def _db_upgrade(config: Config) -> None:
    from router.store import Database

    db = Database(config.database.connection)
    try:
        print(await db.migrate())
    finally:
        await db.dispose()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    if args.command == "config-sample":
        sys.stdout.write(render_sample())
        return 0
    if args.command == "policy-sample":
        from router.policy import sample

        sys.stdout.write(sample())
        return 0
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"headwater: configuration error: {exc}", file=sys.stderr)
        return 2
    from router import log as logsetup

    logsetup.setup(config.default.log_level, config.default.log_format)
    if args.command == "db-upgrade":
        asyncio.run(_db_upgrade(config))
        return 0
    log.info("starting headwater %s", __version__, extra={"config_files": list(config.files) or "embedded defaults",
                                                        "config": config.summary()})
    try:
        asyncio.run(_serve(config))
    except ConfigError as exc:
        print(f"headwater: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # start-up failures: say what failed, exit non-zero
        log.critical("headwater failed: %s", exc, exc_info=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
