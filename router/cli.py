"""The `headwater` command: serve, print the sample configuration, upgrade the database."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from router import __version__
from router import workers
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
    serve.add_argument("--workers", help="override [api] workers: server processes sharing the port and the bus")
    serve.add_argument("--roles", help="override [DEFAULT] roles: what this process runs, comma-separated "
                                       "from api, router, engine, sources (default all)")

    commands.add_parser("config-sample", help="print the documented sample configuration (every option at its default)")
    commands.add_parser("policy-sample", help="print the default policy rules as a YAML policy file ([oslo_policy] policy_file)")

    upgrade = commands.add_parser("db-upgrade", help="apply database migrations (a progress line each) and exit")
    _config_option(upgrade)

    check = commands.add_parser("upgrade-check", help="check for pending migrations and risky settings "
                                                      "(exit 0 success, 1 warning, 2 failure)")
    _config_option(check)

    status = commands.add_parser("status", help="what is configured and whether it answers: database, bus, engine, "
                                                "sources, API, lag")
    _api_options(status)

    events = commands.add_parser("events", help="the event stream").add_subparsers(dest="events_command", metavar="ACTION", required=True)
    tail = events.add_parser("tail", help="print events as they enter, until interrupted")
    _api_options(tail)
    tail.add_argument("--filter", metavar="EXPR", help="only events matching this filter expression, e.g. \"type = 'order.created'\"")
    tail.add_argument("--count", type=int, metavar="N", help="stop after N events")
    tail.add_argument("--json", action="store_true", help="one JSON object per event")
    tail.add_argument("--all-projects", action="store_true", help="admins: every project's events")

    letters = commands.add_parser("deadletters", help="events Headwater gave up on").add_subparsers(
        dest="deadletters_command", metavar="ACTION", required=True)
    listing = letters.add_parser("list", help="list dead letters with their reasons")
    _api_options(listing)
    listing.add_argument("--subscription-id", help="only this subscription's")
    replay = letters.add_parser("replay", help="publish dead letters' events again (to their subscriptions)")
    _api_options(replay)
    replay.add_argument("ids", nargs="+", metavar="ID")
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", action="append", default=[], metavar="PATH",
                        help="INI configuration file; repeatable, later files win")
    parser.add_argument("--data-dir", help="override [DEFAULT] data_dir")


def _api_options(parser: argparse.ArgumentParser) -> None:
    _config_option(parser)
    parser.add_argument("--url", help="the API's base URL (default: [api] public_url of the configuration)")
    parser.add_argument("--token", help="Keystone token (default: $HEADWATER_TOKEN or $OS_AUTH_TOKEN)")


def _admin(args: argparse.Namespace, config: Config) -> int:
    """The operator commands (router.admin), which print to stdout and return the exit code."""
    from router import admin

    out = sys.stdout
    if args.command == "upgrade-check":
        return asyncio.run(admin.upgrade_check(config, out))
    if args.command == "db-upgrade":
        return asyncio.run(admin.db_upgrade(config, out))
    token = admin.token(args.token)
    if args.command == "status":
        return asyncio.run(admin.status(config, args.url, token, out))
    if args.command == "events":
        try:
            return asyncio.run(admin.events_tail(config, args.url, token, args.filter, args.count, args.json,
                                                 args.all_projects, out))
        except KeyboardInterrupt:
            return 0
    if args.deadletters_command == "list":
        return asyncio.run(admin.deadletters_list(config, args.url, token, args.subscription_id, out))
    return asyncio.run(admin.deadletters_replay(config, args.url, token, args.ids, out))


def load_config(args: argparse.Namespace) -> Config:
    overrides = {"api": {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
                         "workers": getattr(args, "workers", None)},
                 "DEFAULT": {"data_dir": getattr(args, "data_dir", None), "roles": getattr(args, "roles", None)}}
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


async def _migrate(config: Config) -> str:
    from router.store import Database

    db = Database(config.database.connection)
    try:
        return await db.migrate()
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

    if args.command != "serve":
        # Operator commands print tables; only warnings and worse go to the log on stderr.
        logsetup.setup("WARNING", config.default.log_format)
        return _admin(args, config)
    logsetup.setup(config.default.log_level, config.default.log_format)
    if config.api.workers > 1 and not workers.is_worker():
        try:
            workers.check(config, config.api.workers)
            # A port already in use is one line here, before any worker starts (each would fail alike).
            from router.app import listen

            listen(config.api.host, config.api.port, reuse_port=True).close()
            asyncio.run(_migrate(config))  # once, here: N workers migrating at once would race
        except ConfigError as exc:
            print(f"headwater: configuration error: {exc}", file=sys.stderr)
            return 2
        return workers.run(sys.argv[1:] if argv is None else argv, config, config.api.workers)
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
