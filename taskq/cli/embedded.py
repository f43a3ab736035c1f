"""``embedded``: start or stop the local Postgres that taskq uses when no DSN is given."""

from __future__ import annotations

import argparse

from .. import _embedded
from .exits import EXIT_OK
from .options import Commands


def add_parser(commands: Commands) -> None:
    embedded = commands.add_parser(
        "embedded", help="the local Postgres used when no DSN is given: start it, or stop it"
    )
    embedded.add_argument("action", choices=["start", "stop"])
    embedded.set_defaults(handler=cmd_embedded)


async def cmd_embedded(args: argparse.Namespace) -> int:
    data_dir = _embedded.default_data_dir()
    if args.action == "stop":
        if not (data_dir / "PG_VERSION").exists():
            print(f"no embedded Postgres in {data_dir}")
            return EXIT_OK
        server = _embedded.EmbeddedServer(
            dsn="",
            data_dir=data_dir,
            log_file=data_dir / "server.log",
            bin_dir=_embedded.bin_dir_for((data_dir / "PG_VERSION").read_text().strip()),
            started=False,
        )
        server.stop()
        print(f"stopped the embedded Postgres in {data_dir}")
        return EXIT_OK
    server = _embedded.ensure_server(data_dir)
    print(f"embedded Postgres {'started' if server.started else 'running'}")
    print(f"  data: {server.data_dir}")
    print(f"  log:  {server.log_file}")
    print(f"  dsn:  {server.dsn}")
    return EXIT_OK
