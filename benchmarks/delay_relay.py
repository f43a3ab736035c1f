"""A TCP relay to Postgres that holds every chunk for a fixed delay, each way: a LAN in a box.

For kernels without ``tc netem``. Run as its own process (so its CPU is its
own, measured apart from the benchmark's)::

    python -m benchmarks.delay_relay --listen 10.233.1.1 \\
        --upstream unix:/tmp/pg/.s.PGSQL.5432 --delay-ms 0.5

It prints the port it listens on, then relays until SIGTERM. Each chunk read
is stamped with the time it arrived and written once that time plus the delay
has come, in order. Chunks queue up meanwhile, so the delay does not add up
behind a busy link and does not limit throughput: a chunk waits its delay
from its own arrival, never a delay per chunk ahead of it.

The event loop uses ``select()``, whose timeout has microsecond resolution:
the epoll selector rounds every timeout up to a whole millisecond, which
would turn 0.5 ms into 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import selectors
import signal
from collections.abc import Awaitable, Callable

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
CHUNK = 65536
PR_SET_TIMERSLACK = 29  # linux/prctl.h


def opener(spec: str) -> Opener:
    """``unix:PATH`` or ``tcp:HOST:PORT``, on this machine only."""
    kind, _, where = spec.partition(":")
    if kind == "unix":
        return lambda: asyncio.open_unix_connection(where)
    host, _, port = where.rpartition(":")
    if kind != "tcp" or host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit(f"upstream must be unix:PATH or tcp:<loopback>:PORT, not {spec!r}")
    return lambda: asyncio.open_connection(host, int(port))


async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while data := await src.read(CHUNK):
        dst.write(data)
        await dst.drain()


async def delayed_copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    held: collections.deque[tuple[float, bytes]] = collections.deque()
    arrived = asyncio.Event()

    async def receive() -> None:
        while True:
            data = await src.read(CHUNK)
            held.append((loop.time() + delay, data))  # b"": the end, after what came before
            arrived.set()
            if not data:
                return

    receiving = asyncio.create_task(receive())
    try:
        while True:
            while not held:
                arrived.clear()
                await arrived.wait()
            wait = held[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # Everything due by now goes out in one write.
            now, out, end = loop.time(), bytearray(), False
            while held and held[0][0] <= now:
                data = held.popleft()[1]
                end = end or not data
                out += data
            if out:
                dst.write(out)
                await dst.drain()
            if end:
                return
    finally:
        receiving.cancel()


class Relay:
    def __init__(self, upstream: Opener, delay: float) -> None:
        self.upstream = upstream
        self.delay = delay
        self.writers: set[asyncio.StreamWriter] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self.upstream()
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                if self.delay > 0:
                    await delayed_copy(src, dst, self.delay)
                else:
                    await copy(src, dst)
            except (OSError, ConnectionError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.writers -= {writer, up_writer}

    def close(self) -> None:
        for w in self.writers:
            w.close()


async def main(listen: str, upstream: Opener, delay: float) -> None:
    relay = Relay(upstream, delay)
    server = await asyncio.start_server(relay.serve, listen, 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
        relay.close()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="address to listen on (port: any free)")
    parser.add_argument("--upstream", required=True, help="unix:PATH or tcp:127.0.0.1:PORT")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="held this long each way")
    args = parser.parse_args()
    # Timers may fire up to the thread's slack late (50 µs by default): ask for none.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_until_complete(main(args.listen, opener(args.upstream), args.delay_ms / 1000))
    loop.close()


if __name__ == "__main__":
    run()
