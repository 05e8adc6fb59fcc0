"""A TCP proxy that delays every byte by a fixed time in each direction.

``tc netem`` is not available on the benchmark machines, so both peers (the
HTTP endpoint of `baifs serve` and the sshd behind sshfs) sit behind this
proxy and pay the same delay per round trip: ``--delay-ms`` one way, twice
that for a request and its answer. Data keeps flowing while earlier data
waits (the delay is latency, not a bandwidth cap), and its order is kept.

Run: ``python -m bench.proxy --target 127.0.0.1:PORT --delay-ms 10``; it
prints ``listening on HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import math
import sys

import trio

CHUNK = 256 * 1024


async def pump(source: trio.SocketStream, sink: trio.SocketStream, delay: float) -> None:
    """Forward ``source`` to ``sink``, each chunk ``delay`` seconds after it arrived."""
    send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

    async def deliver() -> None:
        async for due, data in receive:
            await trio.sleep_until(due)
            await sink.send_all(data)
        await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        async with send:
            while data := await source.receive_some(CHUNK):
                send.send_nowait((trio.current_time() + delay, data))


async def handle(client: trio.SocketStream, host: str, port: int, delay: float) -> None:
    try:
        server = await trio.open_tcp_stream(host, port)
    except OSError:
        await client.aclose()
        return
    async with client, server:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server, delay)
                nursery.start_soon(pump, server, client, delay)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side went away: the connection is over


async def serve(listen_host: str, listen_port: int, host: str, port: int, delay: float) -> None:
    listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
    bound = listeners[0].socket.getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    await trio.serve_listeners(lambda stream: handle(stream, host, port, delay), listeners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default: any port)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="delay in each direction")
    args = parser.parse_args()
    listen_host, _, listen_port = args.listen.rpartition(":")
    host, _, port = args.target.rpartition(":")
    try:
        trio.run(serve, listen_host, int(listen_port), host, int(port), args.delay_ms / 1000)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
