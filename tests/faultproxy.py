"""A fault-injecting HTTP proxy for the tests: between a client (a mount) and `baifs serve`.

Run as a program (``python tests/faultproxy.py --upstream URL``), it prints
``listening on http://127.0.0.1:PORT`` and forwards every request, headers
untouched (so signatures still verify), to the upstream server, unless a
rule says otherwise. Rules are set at run time with ``PUT /_faults`` (JSON),
and what was injected is read with ``GET /_faults``.

A rule names an endpoint (the names ``baifs serve`` counts: ``list``,
``upload``, ``download``, ``execute``, ``info``, ...; ``*`` for all), a
rate, and a fault:

- ``status``: answer with this 5xx status (problem+json), without forwarding;
- ``reset_before``: reset the connection without forwarding;
- ``reset_after``: forward, let the server act, then reset the connection
  instead of answering (the client never hears);
- ``stall``: hold the connection without answering (``seconds``, default
  an hour: past any client timeout);
- ``delay``: wait ``seconds``, then forward;
- ``drip``: forward, then send the answer one byte every ``seconds`` (a
  server that never stalls outright and never finishes);
- ``pad``: forward, then send the answer followed by ``size`` more bytes,
  chunked (a hostile server: an answer larger than the protocol allows);
- ``entries``: forward a listing with ``entries`` (JSON texts, so NaN and
  Infinity can be said) added to its ``files`` (a lying server: names and
  values no directory can hold).

Decisions are deterministic: request number *n* of an endpoint draws from a
generator seeded by ``(seed, endpoint, n)``. ``count`` caps how many times
a rule fires. An upstream that cannot be reached (a killed server) is
answered 502, as a reverse proxy would.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

MAX_BODY = 64 * 1024 * 1024
SESSION_ROUTES = [
    ("POST", re.compile(r"^/session/[^/]+/upload$"), "upload"),
    ("GET", re.compile(r"^/session/[^/]+/files$"), "list"),
    (None, re.compile(r"^/session/[^/]+/download$"), "download"),
    (None, re.compile(r"^/session/[^/]+/download_single$"), "download_single"),
    ("POST", re.compile(r"^/session/[^/]+/interrupt$"), "interrupt"),
    ("POST", re.compile(r"^/session/[^/_][^/]*$"), "execute"),
    ("GET", re.compile(r"^/session/[^/]+$"), "info"),
    ("DELETE", re.compile(r"^/session/[^/]+$"), "destroy"),
    ("POST", re.compile(r"^/session(/_/create)?$"), "create"),
    ("GET", re.compile(r"^/$"), "version"),
]


def endpoint_of(method: str, target: str) -> str:
    path = target.split("?", 1)[0]
    for route_method, pattern, name in SESSION_ROUTES:
        if (route_method is None or route_method == method) and pattern.match(path):
            return name
    return "other"


@dataclass
class Rule:
    endpoint: str
    fault: str
    rate: float = 1.0
    status: int = 502
    seconds: float = 3600.0
    count: int | None = None
    size: int = 0
    entries: list[str] = field(default_factory=list)
    fired: int = 0

    def matches(self, endpoint: str) -> bool:
        return self.endpoint in ("*", endpoint) and (self.count is None or self.fired < self.count)


@dataclass
class Faults:
    seed: int = 0
    rules: list[Rule] = field(default_factory=list)
    seen: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)

    def decide(self, endpoint: str) -> Rule | None:
        number = self.seen[endpoint]
        self.seen[endpoint] += 1
        draw = random.Random(f"{self.seed}:{endpoint}:{number}")
        for rule in self.rules:
            if rule.matches(endpoint) and draw.random() < rule.rate:
                rule.fired += 1
                self.injected[f"{endpoint}:{rule.fault}"] += 1
                return rule
        return None


class Proxy:
    def __init__(self, upstream: str, seed: int) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.faults = Faults(seed)

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        try:
            while True:
                request = await _read_message(stream, connection, h11.Request)
                if request is None:
                    return
                head, body = request
                keep = await self.answer(stream, connection, head, body)
                if not keep or connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, ResetClient):
            _reset(stream)
        finally:
            await stream.aclose()

    async def answer(
        self, stream: trio.SocketStream, connection: h11.Connection, head: Any, body: bytes
    ) -> bool:
        target = head.target.decode("latin-1")
        method = head.method.decode()
        if target.startswith("/_faults"):
            return await self.control(stream, connection, method, body)
        rule = self.faults.decide(endpoint_of(method, target))
        if rule is not None:
            if rule.fault == "reset_before":
                raise ResetClient()
            if rule.fault == "status":
                problem = {"type": "https://api.backend.ai/probs/bad-gateway", "title": "Injected fault."}
                await _send(
                    stream, connection, rule.status, json.dumps(problem).encode(), "application/problem+json"
                )
                return True
            if rule.fault == "stall":
                await trio.sleep(rule.seconds)
                raise ResetClient()
            if rule.fault == "delay":
                await trio.sleep(rule.seconds)
        try:
            status, headers, answer = await self.forward(head, body)
        except OSError:
            problem = {"type": "https://api.backend.ai/probs/bad-gateway", "title": "Upstream unreachable."}
            await _send(stream, connection, 502, json.dumps(problem).encode(), "application/problem+json")
            return True
        fault = rule.fault if rule is not None else ""
        if fault == "reset_after":
            raise ResetClient()
        if fault == "entries":
            answer = _with_entries(answer, rule.entries)
        padding = rule.size if fault == "pad" else 0
        framed = _without_framing(headers, len(answer))
        if padding:  # chunked, with no length to read ahead: the client sees the size only as it streams
            framed = [(n, v) for n, v in framed if n != b"content-length"]
        response = h11.Response(status_code=status, headers=framed)
        await stream.send_all(connection.send(response))
        if fault == "drip":
            for index in range(len(answer)):
                await stream.send_all(connection.send(h11.Data(data=answer[index : index + 1])))
                await trio.sleep(rule.seconds)
        else:
            await stream.send_all(connection.send(h11.Data(data=answer)))
        for start in range(0, padding, 1024 * 1024):
            await stream.send_all(connection.send(h11.Data(data=bytes(min(1024 * 1024, padding - start)))))
        await stream.send_all(connection.send(h11.EndOfMessage()))
        return True

    async def forward(self, head: Any, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        upstream = await trio.open_tcp_stream(self.upstream_host, self.upstream_port)
        async with upstream:
            client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_BODY)
            headers = [(name, value) for name, value in head.headers if name.lower() != b"connection"]
            request = h11.Request(
                method=head.method, target=head.target, headers=_without_framing(headers, len(body))
            )
            await upstream.send_all(
                client.send(request) + client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage())
            )
            response = await _read_message(upstream, client, h11.Response)
            if response is None:
                raise OSError("the upstream closed the connection")
            answer, content = response
            return answer.status_code, list(answer.headers), content

    async def control(
        self, stream: trio.SocketStream, connection: h11.Connection, method: str, body: bytes
    ) -> bool:
        if method == "PUT":
            document = json.loads(body or b"{}")
            self.faults.rules = [Rule(**rule) for rule in document.get("rules", [])]
            if "seed" in document:
                self.faults.seed = int(document["seed"])
        state = {
            "seed": self.faults.seed,
            "seen": dict(self.faults.seen),
            "injected": dict(self.faults.injected),
            "rules": [rule.__dict__ for rule in self.faults.rules],
        }
        await _send(stream, connection, 200, json.dumps(state).encode(), "application/json")
        return True


def _with_entries(answer: bytes, entries: list[str]) -> bytes:
    """A listing answer with ``entries`` (JSON texts) added to the JSON text in its ``files``."""
    document = json.loads(answer)
    files = (document.get("files") or "[]").strip()
    document["files"] = files[:-1].rstrip() + ("," if files != "[]" else "") + ",".join(entries) + "]"
    return json.dumps(document).encode()


class ResetClient(Exception):
    """Close the client's connection with a reset instead of an answer."""


def _reset(stream: trio.SocketStream) -> None:
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _without_framing(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(n, v) for n, v in headers if n.lower() not in (b"content-length", b"transfer-encoding")]
    return [*kept, (b"content-length", str(length).encode())]


async def _read_message(
    stream: trio.SocketStream, connection: h11.Connection, kind: type
) -> tuple[Any, bytes] | None:
    """One whole request or response (head and body), or None at a clean end of the connection."""
    head = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data and head is None and connection.their_state in (h11.IDLE, h11.DONE):
                return None
            connection.receive_data(data)
        elif isinstance(event, kind):
            head = event
        elif isinstance(event, h11.Data):
            body.extend(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return head, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(
    stream: trio.SocketStream, connection: h11.Connection, status: int, body: bytes, kind: str
) -> None:
    headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
    data = connection.send(h11.Response(status_code=status, headers=headers))
    await stream.send_all(data + connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage()))


async def main(arguments: argparse.Namespace) -> None:
    proxy = Proxy(arguments.upstream, arguments.seed)
    listeners = await trio.open_tcp_listeners(arguments.port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    await proxy.serve(listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    try:
        trio.run(main, parser.parse_args())
    except KeyboardInterrupt:
        sys.exit(0)
