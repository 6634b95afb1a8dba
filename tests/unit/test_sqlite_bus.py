"""What the sqlite bus adds to the bus contract: its file is the owner's only, a process killed
holding deliveries gives them back at the next start (not after its lease), and a wrong URL is a
configuration error that names the option."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from router.bus.sqlite import SqliteBus
from router.config import Config, ConfigError
from router.events import Event

ROOT = Path(__file__).resolve().parents[2]

# A consumer in another process that takes the event, says so, and never settles it.
HOLDER = textwrap.dedent("""
    import asyncio, sys
    from router.bus.sqlite import SqliteBus

    async def main(url):
        bus = SqliteBus(url=url)
        await bus.start()
        async def hold(delivery):
            print("HOLDING", delivery.event.id, delivery.attempt, flush=True)
            await asyncio.Event().wait()
        await bus.consume("events", "router", hold)
        await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1]))
""")


def event() -> Event:
    return Event(id=str(uuid.uuid4()), source="/t", type="t", data={"n": 1})


async def test_the_bus_file_is_created_for_its_owner_only(tmp_path):
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path / "data")}})
    bus = SqliteBus(config)
    await bus.start()
    try:
        await bus.publish(event())
        assert bus.path == tmp_path / "data" / "bus.db"
        assert stat.S_IMODE(os.stat(bus.path).st_mode) == 0o600
    finally:
        await bus.close()


async def test_deliveries_of_a_killed_process_come_back_at_the_next_start_not_after_the_lease(tmp_path):
    url = f"sqlite://{tmp_path / 'bus.db'}?lease=3600"  # an hour: only the dead owner's lock can free it
    publisher = SqliteBus(url=url)
    await publisher.start()
    await publisher.ensure_group("events", "router")
    sent = event()
    await publisher.publish(sent)
    await publisher.close()
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLDER, url, cwd=str(ROOT),
                                                  stdout=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(holder.stdout.readline(), 60)
        assert line.decode().split() == ["HOLDING", sent.id, "1"]
    finally:
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
    bus = SqliteBus(url=url)
    await bus.start()
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def take(delivery) -> None:
        if not got.done():
            got.set_result((delivery.event, delivery.attempt))

    try:
        await bus.consume("events", "router", take)
        again, attempt = await asyncio.wait_for(got, 30)
        assert again == sent and attempt == 2
    finally:
        await bus.close()


@pytest.mark.parametrize("url, fault", [
    ("amqp://guest@localhost/", "[bus] url = 'amqp://guest@localhost/': the sqlite bus takes sqlite:///"),
    ("sqlite:///tmp/x.db?color=red", "[bus] url option 'color' is unknown to the sqlite bus"),
    ("sqlite:///tmp/x.db?lease=soon", "[bus] url option lease='soon' is not a number"),
    ("sqlite:///tmp/x.db?poll=0", "[bus] url option poll='0' must be positive"),
])
def test_a_wrong_url_names_the_option(url, fault):
    with pytest.raises(ConfigError) as raised:
        SqliteBus(url=url)
    assert fault in str(raised.value)
