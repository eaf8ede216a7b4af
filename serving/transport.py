"""The ingress's ZMQ side: sockets, CurveZMQ, REQ envelopes in and out, robots connected.

One ROUTER socket per configured port accepts any number of REQ robots; every request becomes an asyncio task,
so robots are served concurrently, never one at a time. Frames are read without a copy (the body is handed on
as a memoryview of the ZMQ frame) and the reply goes back on the envelope it came with. What a body means is
the handler's business (`serving.endpoints`): this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import zmq
import zmq.asyncio
import zmq.auth

from serving.config import CurveConfig, IngressConfig, PortConfig

# (port, body, received epoch s) -> (reply bytes, called with the send's duration in s, or None)
Handler = Callable[[PortConfig, memoryview, float], Awaitable[tuple[bytes, Callable[[float], None] | None]]]


class _AllowList:
    """ZAP credentials provider: the CURVE public keys (z85) allowed to connect."""

    def __init__(self, keys: list[str]):
        self._keys = {k.encode() for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys  # pyzmq hands the client key over z85-encoded, as the config writes it


class ZmqTransport:
    def __init__(self, config: IngressConfig, handler: Handler,
                 on_robots: Callable[[int, int], None] = lambda port, n: None):
        self.config = config
        self._handler = handler
        self._on_robots = on_robots
        self._ctx = zmq.asyncio.Context()
        self._auth = self._start_curve_auth(config.curve) if config.curve is not None else None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._loops: list[asyncio.Task] = []
        self._monitors: list[asyncio.Task] = []
        self._handlers: set[asyncio.Task] = set()
        self._closing = False
        self.robots: dict[int, int] = {}
        for port in config.ports:
            self._sockets.append(self._bind(port))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock, port in zip(self._sockets, self.config.ports):
            self._loops.append(loop.create_task(self._serve(sock, port), name=f"zmq-{port.port}"))
            self._monitors.append(loop.create_task(self._count_robots(sock, port.port), name=f"monitor-{port.port}"))

    @property
    def open_requests(self) -> int:
        return len(self._handlers)

    def endpoints(self) -> str:
        return ", ".join(f"tcp://{self.config.host}:{p.port} ({p.embodiment})" for p in self.config.ports)

    def _start_curve_auth(self, curve: CurveConfig):
        """ZMQ's ZAP handler: with an allow-list, only those client keys complete the CURVE handshake."""
        from zmq.auth.asyncio import AsyncioAuthenticator

        auth = AsyncioAuthenticator(self._ctx)
        auth.start()
        if curve.allowed_client_keys is None:
            auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(curve.allowed_client_keys))
        return auth

    def _bind(self, port: PortConfig) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        if self.config.curve is not None:
            sock.curve_server = True
            sock.curve_publickey = self.config.curve.server_public_key.encode()
            sock.curve_secretkey = self.config.curve.server_secret_key.encode()
        address = f"tcp://{self.config.host}:{port.port}"
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            for other in self._sockets:
                other.close(0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.destroy(linger=0)
            raise RuntimeError(
                f"ingress.ports: cannot bind {address} for {port.embodiment!r}: {exc.strerror}"
                + (" (another server, or another fleetserve app, holds this port)" if exc.errno == zmq.EADDRINUSE else "")
            ) from None
        return sock

    async def _serve(self, sock: zmq.asyncio.Socket, port: PortConfig) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            frames = await sock.recv_multipart(copy=False)
            received = time.time()
            # A REQ robot's request arrives as [identity, b"", body]; the reply must go back the same way.
            if len(frames) < 3 or frames[-2].bytes != b"":
                continue  # not a REQ peer; there is no envelope to answer on
            task = loop.create_task(self._answer(sock, port, frames, received))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _answer(self, sock: zmq.asyncio.Socket, port: PortConfig, frames: list[zmq.Frame], received: float) -> None:
        payload, on_sent = await self._handler(port, frames[-1].buffer, received)
        sent = time.perf_counter()
        await sock.send_multipart([frames[0], b"", payload], copy=False)
        if on_sent is not None:
            on_sent(time.perf_counter() - sent)

    async def _count_robots(self, sock: zmq.asyncio.Socket, port: int) -> None:
        """Robots connected to a port, from ZMQ's socket monitor (accepted minus disconnected peers)."""
        monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.robots[port] = 0
        try:
            while True:
                frames = await monitor.recv_multipart()
                event = int.from_bytes(frames[0][:2], "little")
                self.robots[port] += 1 if event == zmq.EVENT_ACCEPTED else -1
                self._on_robots(port, self.robots[port])
        finally:
            monitor.close(0)  # an open socket would make ctx.term() block the shutdown

    def check_health(self) -> None:
        for task in self._loops:
            if task.done():
                raise RuntimeError(f"ingress task {task.get_name()} stopped: "
                                   f"{task.exception() if not task.cancelled() else 'cancelled'}")

    def stop_receiving(self) -> None:
        self._closing = True
        for t in self._loops + self._monitors:
            t.cancel()

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for the requests being answered (graceful shutdown)."""
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=timeout_s)

    async def close(self) -> None:
        await asyncio.gather(*self._loops, *self._monitors, return_exceptions=True)
        for s in self._sockets:
            s.disable_monitor()
            s.close(0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.destroy(linger=0)  # never blocks, whatever socket is still open
