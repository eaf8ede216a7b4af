"""The ZMQ ingress: unmodified GR00T robots (REQ sockets) in, policy deployments out.

One ROUTER socket per configured port accepts any number of REQ robots; every request becomes an asyncio
task, so robots are served concurrently, never one at a time. Every request is answered, the failing ones
with `{"error": ...}` naming the fault. get_action requests go through the embodiment's micro-batcher (one
Ray call per batch); the rare endpoints (reset, get_modality_config, info) call the policy directly.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from importlib import metadata
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth
from ray import serve
from ray.serve.handle import DeploymentHandle

from clients.codec import CodecError, DecodeLimits, packb, unpackb
from serving.batcher import EmbodimentBatcher
from serving.config import LOW_LATENCY_ENV_VARS, AdmissionConfig, CurveConfig, IngressConfig, PortConfig
from serving.messages import InferenceRequest
from serving.metrics import FleetMetrics, MetricsBuffer
from serving.protocol import (
    UNAUTHORIZED,
    RequestError,
    format_action_reply,
    parse_action_request,
    parse_envelope,
    parse_options,
)
from serving.router import EmbodimentRouter

logger = logging.getLogger("ray.serve")

try:
    VERSION = metadata.version("fleetserve")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0+unknown"

KILL_REFUSED = "kill: refused; this server is shared by a fleet, its operator stops it (serve shutdown)"
METRICS_FLUSH_S = 1.0
REPLICA_WATCH_S = 2.0
DELIVERY_MARGIN_S = 0.015  # at most; 10% of a short deadline


class _Once:
    """Fetch a value from a replica once, share it with every waiting request, retry after a failure."""

    def __init__(self, fetch):
        self._fetch = fetch
        self._task: asyncio.Task | None = None

    async def _run(self):
        return await self._fetch()

    async def get(self):
        if self._task is None or (self._task.done() and self._task.exception() is not None):
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await asyncio.shield(self._task)


class _AllowList:
    """ZAP credentials provider: the CURVE public keys (z85) allowed to connect."""

    def __init__(self, keys: list[str]):
        self._keys = {k.encode() for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys  # pyzmq hands the client key over z85-encoded, as the config writes it


def _rss_mb() -> float:
    """Resident memory of this process (Linux), for the status page: a leak shows as a climb here."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return -1.0


def slo_outcome(outcome: str, reply: Any) -> str:
    """How a get_action ended against its deadline, for fleetserve_slo_requests_total (serving/metrics.py)."""
    if outcome == "ok":
        return "on_time"  # the batcher never hands over an action after its deadline
    if outcome == "deadline":
        early = isinstance(reply, dict) and str(reply.get("error", "")).startswith("deadline: refused early")
        return "refused_early" if early else "expired"
    return "error"


class _Call:
    """What the metrics need to know about one request, filled in as it is parsed."""

    __slots__ = ("embodiment", "endpoint", "outcome")

    def __init__(self, embodiment: str):
        self.embodiment, self.endpoint, self.outcome = embodiment, "unknown", "ok"


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, num_replicas=1, max_ongoing_requests=100)
class ZmqIngress:
    async def __init__(
        self,
        config: IngressConfig,
        handles: dict[str, DeploymentHandle],
        admission: dict[str, AdmissionConfig],
    ):
        missing = {k: v for k, v in LOW_LATENCY_ENV_VARS.items() if os.environ.get(k) != v}
        if missing:
            logger.warning(
                "The application's runtime_env lacks %s: every batch pays ~1-4 ms more in Ray calls. "
                "Add them under `runtime_env: {env_vars: ...}` of the application (see serve_config.yaml).",
                ", ".join(f"{k}={v}" for k, v in missing.items()),
            )
        self.config = config
        self.admission = admission
        self._limits = DecodeLimits(max_message_bytes=config.max_message_bytes, max_array_bytes=config.max_message_bytes)
        self.router: EmbodimentRouter[DeploymentHandle] = EmbodimentRouter(handles)
        self.batchers: dict[str, EmbodimentBatcher] = {}
        self._describe: dict[str, _Once] = {}
        self._modality: dict[str, _Once] = {}
        for tag, handle in self.router.items():
            # Batching starts at the defaults and follows each replica's live user_config from its first reply.
            self.batchers[tag] = EmbodimentBatcher(
                tag,
                (lambda reqs, load, h=handle: h.infer.remote(reqs, load)),
                max_inflight=config.max_inflight_batches,
                max_queued=admission[tag].max_queued_requests,
                scheduler=config.scheduler,
                with_load=True,
            )
            self._describe[tag] = _Once(lambda h=handle: h.describe.remote())
            self._modality[tag] = _Once(lambda h=handle: h.modality_config.remote())
        for b in self.batchers.values():
            b.start()
        self._ctx = zmq.asyncio.Context()
        self._auth = self._start_curve_auth(config.curve) if config.curve is not None else None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._loops: list[asyncio.Task] = []
        self._handlers: set[asyncio.Task] = set()
        self._closing = False
        self._metrics = MetricsBuffer(FleetMetrics())
        self._robots: dict[int, int] = {}
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._flush_metrics(), name="metrics"),
                            loop.create_task(self._watch_replicas(), name="replicas")]
        for port in config.ports:
            sock = self._bind(port)
            self._sockets.append(sock)
            self._loops.append(loop.create_task(self._serve(sock, port), name=f"zmq-{port.port}"))
            self._background.append(loop.create_task(self._count_robots(sock, port.port), name=f"monitor-{port.port}"))
        self._announce = asyncio.get_running_loop().create_task(self._announce_when_ready())

    async def _announce_when_ready(self) -> None:
        """One log line, once every policy answers, telling the user how to connect a robot."""
        endpoints = ", ".join(f"tcp://{self.config.host}:{p.port} ({p.embodiment})" for p in self.config.ports)
        logger.info("ZMQ ingress listening on %s; waiting for the policies to load", endpoints)
        try:
            await asyncio.gather(*(d.get() for d in self._describe.values()))
        except Exception as exc:
            logger.error("A policy failed to load, see its deployment in `serve status`: %s", exc)
            return
        first = self.config.ports[0]
        logger.info(
            "Fleet ready: %s. Connect a robot: clients.PolicyClient(host=%r, port=%d), "
            "or try `python -m clients.example --port %d`.",
            endpoints, self.config.host, first.port, first.port,
        )

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
            raise RuntimeError(
                f"ingress.ports: cannot bind {address} for {port.embodiment!r}: {exc.strerror}"
                + (" (another server, or another fleetserve app, holds this port)" if exc.errno == zmq.EADDRINUSE else "")
            ) from None
        return sock

    async def _serve(self, sock: zmq.asyncio.Socket, port: PortConfig) -> None:
        token = port.api_token if port.api_token is not None else self.config.api_token
        while not self._closing:
            frames = await sock.recv_multipart(copy=False)
            task = asyncio.get_running_loop().create_task(self._answer(sock, port, token, frames))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _answer(self, sock, port: PortConfig, token: str | None, frames: list[zmq.Frame]) -> None:
        # A REQ robot's request arrives as [identity, b"", body]; the reply must go back the same way.
        if len(frames) < 3 or frames[-2].bytes != b"":
            return  # not a REQ peer; there is no envelope to answer on
        received = time.time()
        call = _Call(port.embodiment)
        try:
            reply = await self._respond(call, port, token, frames[-1].buffer, received)
        except RequestError as exc:
            reply, call.outcome = {"error": str(exc)}, exc.kind
        except Exception as exc:  # a bug of ours must still reach the robot as an answer
            logger.exception("Unexpected error answering a request on port %d", port.port)
            reply, call.outcome = {"error": f"internal error: {type(exc).__name__}: {exc}"}, "internal"
        try:
            payload = packb(reply)
        except Exception as exc:
            payload, call.outcome = packb({"error": f"internal error: reply could not be encoded: {exc}"}), "internal"
        self._metrics.request(call.embodiment, call.endpoint, call.outcome)
        if call.endpoint == "get_action":
            self._metrics.slo(call.embodiment, port.port, slo_outcome(call.outcome, reply))
        await sock.send_multipart([frames[0], b"", payload], copy=False)

    async def _respond(self, call: "_Call", port: PortConfig, token: str | None, body, received: float) -> Any:
        try:
            msg = unpackb(body, limits=self._limits)
        except CodecError as exc:
            raise RequestError(f"request: {exc}") from None
        env = parse_envelope(msg)
        call.endpoint = env.endpoint
        if token is not None and not hmac.compare_digest((env.api_token or "").encode(), token.encode()):
            raise RequestError(UNAUTHORIZED, "unauthorized")
        tag = self.router.resolve(env.embodiment_tag or port.embodiment)
        call.embodiment = tag
        if env.endpoint == "get_action":
            return await self._get_action(tag, env.data, received, port.slo_ms)
        if env.endpoint == "ping":
            return {"status": "ok", "message": "Server is running", "embodiment_tag": tag}
        if env.endpoint == "get_modality_config":
            return await self._modality[tag].get()
        if env.endpoint == "reset":
            return await self.router.handle(tag).reset.remote(parse_options(env.data.get("options")))
        if env.endpoint == "info":
            return await self._info(port)
        if env.endpoint == "kill":
            raise RequestError(KILL_REFUSED, "refused")
        raise RequestError(f"endpoint: {env.endpoint!r} is not served")  # parse_envelope lets only known ones through

    async def _get_action(self, tag: str, data: dict, received: float, port_slo_ms: float | None = None) -> Any:
        req = parse_action_request(data)
        if not 1 <= req.samples <= self.config.max_batch_per_request:
            raise RequestError(
                f"observation: expected a batch size B from 1 to {self.config.max_batch_per_request}, got {req.samples}"
            )
        options, asked = req.options, None
        if options is not None and "deadline_ms" in options:
            options = dict(options)
            asked = options.pop("deadline_ms")  # ours, not the policy's
            if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not asked > 0:
                raise RequestError(f"options.deadline_ms: expected a positive number of milliseconds, got {asked!r:.40}")
        budget_ms = self.admission[tag].deadline_ms(asked, port_slo_ms)
        # The robot's clock started before ours and stops after the reply crosses the network: the scheduler
        # aims a little before the deadline, so an action it delivers is still on time where the robot is.
        margin_s = min(DELIVERY_MARGIN_S, 0.1 * budget_ms / 1000.0)
        delivered = await self.batchers[tag].submit(
            InferenceRequest(req.observation, options, req.samples), received, received + budget_ms / 1000.0 - margin_s
        )
        outcome = delivered.outcome
        if outcome.error is not None:
            raise RequestError(outcome.error, outcome.error_kind or "policy")
        total_ms = (time.time() - received) * 1000.0
        self._metrics.action(tag, delivered.batch_size, delivered.queue_ms, delivered.infer_ms, total_ms,
                             delivered.predicted_ms)
        info = dict(outcome.info)
        info["server"] = {
            "batch_size": delivered.batch_size,
            "embodiment_tag": tag,
            "replica": delivered.replica,
            "queue_ms": round(delivered.queue_ms, 3),
            "infer_ms": round(delivered.infer_ms, 3),
            "deadline_ms": round(budget_ms, 3),
            "total_ms": round(total_ms, 3),
        }
        return format_action_reply(req, outcome.action, info)

    async def _info(self, port: PortConfig) -> dict[str, Any]:
        tags = self.router.tags
        described = await asyncio.gather(*(self._describe[t].get() for t in tags))
        return {"default_embodiment": port.embodiment, "embodiments": dict(zip(tags, described)), "version": VERSION}

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_S)
            self._metrics.flush()
            for tag, b in self.batchers.items():
                self._metrics.sink.queue_depth.set(b.queued, tags={"embodiment": tag})

    async def _watch_replicas(self) -> None:
        """Tell each batcher how many replicas its deployment runs (Serve's status), so the EDF scheduler
        keeps every replica busy, including one autoscaling just added."""
        names = {tag: handle.deployment_name for tag, handle in self.router.items()}
        app = serve.get_replica_context().app_name
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[app].deployments
                for tag, name in names.items():
                    if name in deployments:
                        running = deployments[name].replica_states.get("RUNNING", 0)
                        self.batchers[tag].set_replicas(running)
                # Replicas with work to do, over every embodiment: the replicas share the cores by this count.
                busy = sum(b.replicas for b in self.batchers.values() if b.demand_samples_per_s() > 0)
                for b in self.batchers.values():
                    b.fleet_load["busy_replicas"] = float(max(1, busy))
            except Exception as exc:  # the controller restarting: the batchers keep what they knew
                logger.debug("replica count unavailable: %s", exc)
            await asyncio.sleep(REPLICA_WATCH_S)

    async def _count_robots(self, sock: zmq.asyncio.Socket, port: int) -> None:
        """Robots connected to a port, from ZMQ's socket monitor (accepted minus disconnected peers)."""
        monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._robots[port] = 0
        try:
            while True:
                frames = await monitor.recv_multipart()
                event = int.from_bytes(frames[0][:2], "little")
                self._robots[port] += 1 if event == zmq.EVENT_ACCEPTED else -1
                self._metrics.sink.robots.set(self._robots[port], tags={"port": str(port)})
        finally:
            monitor.close(0)  # an open socket would make ctx.term() block the shutdown

    async def __call__(self, request) -> dict[str, Any]:
        """HTTP status page (the Serve proxy's route): where robots connect and how the queues look."""
        return {
            "ports": [{"address": f"tcp://{self.config.host}:{p.port}", "embodiment": p.embodiment} for p in self.config.ports],
            "embodiments": {tag: b.stats() for tag, b in self.batchers.items()},
            "open_requests": len(self._handlers),
            "robots_connected": {str(p): n for p, n in self._robots.items()},
            "rss_mb": _rss_mb(),
            "version": VERSION,
        }

    def check_health(self) -> None:
        for task in self._loops:
            if task.done():
                raise RuntimeError(f"ingress task {task.get_name()} stopped: {task.exception() if not task.cancelled() else 'cancelled'}")
        for tag, b in self.batchers.items():
            if not b.alive:
                raise RuntimeError(f"ingress batcher of {tag!r} stopped")

    async def __del__(self) -> None:
        # Graceful shutdown: stop taking requests, answer the ones in flight, then close the sockets.
        self._closing = True
        for t in self._loops + self._background:
            t.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=10)
        for b in self.batchers.values():
            await b.close()
        await asyncio.gather(*self._loops, *self._background, return_exceptions=True)
        for s in self._sockets:
            s.disable_monitor()
            s.close(0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.destroy(linger=0)  # never blocks, whatever socket is still open
