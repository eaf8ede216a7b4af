"""The ZMQ ingress: unmodified GR00T robots (REQ sockets) in, policy deployments out.

One ROUTER socket per configured port accepts any number of REQ robots; every request becomes an asyncio
task, so robots are served concurrently, never one at a time. Every request is answered, the failing ones
with `{"error": message, "kind": kind}` naming the fault, and every reply goes back in the array encoding its
request came in (N1.6 `.npy` or msgpack-numpy), since clients built on msgpack-numpy read nothing else. A port
declared `protocol: n1.5` answers as upstream's N1.5 server did (`clients.protocol`). get_action requests go through the embodiment's micro-batcher (one
Ray call per batch); the rare endpoints (reset, get_modality_config, info) call the policy directly.

A request may name a fine-tune of its embodiment (`options["model_id"]`, or a top-level `"model_id"`; else the
port's default model, else the embodiment's): its batches go to the policy deployment with that multiplexed
model id, from a batcher of its own, so a batch never mixes models.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections import deque
from importlib import metadata
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth
from ray import serve
from ray.serve.handle import DeploymentHandle

from clients.codec import CodecError, DecodeLimits, packb, unpackb_with_encoding
from serving.batcher import EmbodimentBatcher
from serving.replica_pool import ReplicaPool
from serving.config import DEFAULT_MODEL, LOW_LATENCY_ENV_VARS, AdmissionConfig, CurveConfig, IngressConfig, PortConfig
from serving.messages import InferenceRequest
from serving.metrics import FleetMetrics, MetricsBuffer
from serving.protocol import (
    UNAUTHORIZED,
    ArrayEncoding,
    ErrorKind,
    PortProtocol,
    RequestError,
    error_reply,
    format_action_reply,
    modality_config_n15,
    parse_action_request,
    parse_envelope,
    parse_options,
)
from serving.residency import ResidentModels
from serving.router import EmbodimentRouter

logger = logging.getLogger("ray.serve")

try:
    VERSION = metadata.version("fleetserve")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0+unknown"

KILL_REFUSED = "kill: refused; this server is shared by a fleet, its operator stops it (serve shutdown)"
METRICS_FLUSH_S = 1.0
# An unknown model name asks the replicas for their live model set (it may have been added by `serve deploy`
# since) at most this often per embodiment; robots sending made-up names cost one Ray call per interval.
MODELS_REFRESH_S = 1.0
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


def _pop_model_id(options: dict[str, Any] | None, top_level: str | None) -> Any:
    """The model a request names: options["model_id"] (taken out: ours, not the policy's), else the top level."""
    if options is not None and "model_id" in options:
        return options.pop("model_id")
    return top_level


def slo_outcome(outcome: str, reply: Any) -> str:
    """How a get_action ended against its deadline, for fleetserve_slo_requests_total (serving/metrics.py)."""
    if outcome == "ok":
        return "on_time"  # the batcher never hands over an action after its deadline
    if outcome == "deadline":
        early = isinstance(reply, dict) and str(reply.get("error", "")).startswith("deadline: refused early")
        return "refused_early" if early else "expired"
    return "error"


class _ModelCounts:
    """One model's requests and the cold loads they waited on (the load time the replicas measured)."""

    __slots__ = ("requests", "cold_requests", "cold_batches", "cold_ms_sum", "cold_ms_last")

    def __init__(self):
        self.requests = self.cold_requests = self.cold_batches = 0
        self.cold_ms_sum = self.cold_ms_last = 0.0

    def add(self, requests: int, cold_load_ms: float) -> None:
        self.requests += requests
        if cold_load_ms:
            self.cold_requests += requests
            self.cold_batches += 1
            self.cold_ms_sum += cold_load_ms
            self.cold_ms_last = cold_load_ms

    def status(self) -> dict[str, float]:
        out: dict[str, float] = {"requests": self.requests, "cold_load_requests": self.cold_requests}
        if self.cold_batches:
            out["cold_load_ms_mean"] = round(self.cold_ms_sum / self.cold_batches, 1)
            out["cold_load_ms_last"] = round(self.cold_ms_last, 1)
        return out


class _ReplyHops:
    """Encode and send times of the last traced replies: the hops a reply's own trace cannot carry."""

    def __init__(self, size: int = 512):
        self._encode: deque[float] = deque(maxlen=size)
        self._send: deque[float] = deque(maxlen=size)

    def add(self, encode_s: float, send_s: float) -> None:
        self._encode.append(encode_s * 1000.0)
        self._send.append(send_s * 1000.0)

    def status(self) -> dict[str, float | None]:
        def p50(xs):
            return round(sorted(xs)[len(xs) // 2], 4) if xs else None
        return {"encode_ms_p50": p50(self._encode), "send_ms_p50": p50(self._send), "replies": len(self._encode)}


class _Call:
    """What the metrics need to know about one request, filled in as it is parsed."""

    __slots__ = ("embodiment", "endpoint", "outcome", "encoding", "model", "traced")

    def __init__(self, embodiment: str):
        self.embodiment, self.endpoint, self.outcome, self.model = embodiment, "unknown", "ok", None
        self.traced = False
        self.encoding: ArrayEncoding | None = None  # of the request's arrays: the reply's goes the same way


def _device_of(description: Any) -> str:
    """"cuda:0 (NVIDIA H100 80GB HBM3, bfloat16)" from a replica's describe(): which device it got, in the log."""
    model = description.get("model", {}) if isinstance(description, dict) else {}
    extra = ", ".join(str(model[k]) for k in ("device_name", "dtype") if model.get(k))
    return f"{model.get('device', 'unknown device')}" + (f" ({extra})" if extra else "")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, num_replicas=1, max_ongoing_requests=100)
class ZmqIngress:
    async def __init__(
        self,
        config: IngressConfig,
        handles: dict[str, DeploymentHandle],
        admission: dict[str, AdmissionConfig],
        models: dict[str, list[str]] | None = None,
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
        # One batcher per (embodiment, model): the default models' now, a fine-tune's at its first request.
        self.batchers: dict[tuple[str, str], EmbodimentBatcher] = {}
        # ... all of an embodiment's batchers plan against its replicas together.
        self.pools: dict[str, ReplicaPool] = {tag: ReplicaPool(tag) for tag, _ in self.router.items()}
        self._describe: dict[str, _Once] = {}
        self._modality: dict[tuple[str, str], _Once] = {}
        # Model names each embodiment serves (args at start, then the replicas' live user_config), and which
        # models each replica holds (from its replies).
        self._served: dict[str, set[str]] = {
            tag: {DEFAULT_MODEL, *(models or {}).get(tag, [])} for tag, _ in self.router.items()
        }
        self._models_checked: dict[str, float] = {}
        # (tag, model) -> what the status page says of its requests and the cold loads they waited on
        self._model_counts: dict[tuple[str, str], _ModelCounts] = {}
        # models each replica holds, as it last reported, pruned to the running replicas when `info` reads it
        self._resident: dict[str, ResidentModels] = {tag: ResidentModels() for tag, _ in self.router.items()}
        self._running: dict[str, int] = {}  # RUNNING replicas per embodiment, from Serve's status (_watch_replicas)
        for tag, handle in self.router.items():
            self._describe[tag] = _Once(lambda h=handle: h.describe.remote())
            self._batcher(tag, DEFAULT_MODEL)
        self._ctx = zmq.asyncio.Context()
        self._auth = self._start_curve_auth(config.curve) if config.curve is not None else None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._loops: list[asyncio.Task] = []
        self._handlers: set[asyncio.Task] = set()
        self._closing = False
        self._metrics = MetricsBuffer(FleetMetrics())
        self._robots: dict[int, int] = {}
        self._hops = _ReplyHops()
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._flush_metrics(), name="metrics"),
                            loop.create_task(self._watch_replicas(), name="replicas")]
        for port in config.ports:
            sock = self._bind(port)
            self._sockets.append(sock)
            self._loops.append(loop.create_task(self._serve(sock, port), name=f"zmq-{port.port}"))
            self._background.append(loop.create_task(self._count_robots(sock, port.port), name=f"monitor-{port.port}"))
        self._announce = asyncio.get_running_loop().create_task(self._announce_when_ready())

    def _model_handle(self, tag: str, model: str) -> DeploymentHandle:
        handle = self.router.handle(tag)
        # The default model answers calls without a multiplexed id; a fine-tune's id routes its calls to the
        # replicas that hold it (Serve's multiplexing).
        return handle if model == DEFAULT_MODEL else handle.options(multiplexed_model_id=model)

    def _batcher(self, tag: str, model: str) -> EmbodimentBatcher:
        key = (tag, model)
        batcher = self.batchers.get(key)
        if batcher is None:
            handle = self._model_handle(tag, model)

            async def send(reqs: list[InferenceRequest], load: dict[str, float]):
                reply = await handle.infer.remote(reqs, load)
                if reply.models_resident:
                    self._resident[tag][reply.replica] = reply.models_resident
                self._model_counts.setdefault(key, _ModelCounts()).add(len(reqs), reply.cold_load_ms)
                return reply

            # Batching starts at the defaults and follows each replica's live user_config from its first reply.
            batcher = EmbodimentBatcher(
                tag if model == DEFAULT_MODEL else f"{tag}/{model}",
                send,
                max_inflight=self.config.max_inflight_batches,
                max_queued=self.admission[tag].max_queued_requests,
                scheduler=self.config.scheduler,
                with_load=True,
                pool=self.pools[tag],
                resident=None if model == DEFAULT_MODEL else (
                    lambda: bool(self._resident[tag].holding(model))
                ),
            )
            batcher.start()
            self.batchers[key] = batcher
        return batcher

    async def _model_table(self, tag: str) -> dict[str, Any]:
        """One replica's live view of `tag`'s models (served set, resident models, cold-load times)."""
        table = await self.router.handle(tag).models.remote()
        self._served[tag] = set(table["served"])
        self._resident[tag][table["replica"]] = table["resident"]
        if not self.pools[tag].cold_load_ms:  # until a fine-tune loads: as long as the default model took
            self.pools[tag].observe_cold_load(max(table.get("cold_load_ms", {}).values(), default=0.0))
        self._models_checked[tag] = time.monotonic()
        # Batchers of models no longer served go; their robots are refused from now on.
        for key in [k for k in self.batchers if k[0] == tag and k[1] not in self._served[tag]]:
            batcher = self.batchers.pop(key)
            asyncio.get_running_loop().create_task(batcher.close())
        return table

    async def _choose_model(self, tag: str, port: PortConfig, asked: Any) -> str:
        if asked is None:
            if port.model is not None and port.embodiment == tag:
                return port.model
            return DEFAULT_MODEL
        if not isinstance(asked, str):
            raise RequestError(f"model_id: expected a string (a model name), got {type(asked).__name__}")
        if asked not in self._served[tag] and time.monotonic() - self._models_checked.get(tag, 0.0) > MODELS_REFRESH_S:
            await self._model_table(tag)  # added by `serve deploy` since we last looked?
        if asked not in self._served[tag]:
            raise RequestError(
                f"model_id: {asked!r:.80} is not served for {tag!r}; served: {', '.join(sorted(self._served[tag]))}"
            )
        return asked

    async def _announce_when_ready(self) -> None:
        """One log line, once every policy answers, telling the user how to connect a robot."""
        endpoints = ", ".join(f"tcp://{self.config.host}:{p.port} ({p.embodiment})" for p in self.config.ports)
        logger.info("ZMQ ingress listening on %s; waiting for the policies to load", endpoints)
        try:
            described = await asyncio.gather(*(d.get() for d in self._describe.values()))
        except Exception as exc:
            logger.error("A policy failed to load, see its deployment in `serve status`: %s", exc)
            return
        # Embodiments with fine-tunes: the replicas' load times, so a first cold load is predicted too.
        with_fine_tunes = [tag for tag, served in self._served.items() if len(served) > 1]
        await asyncio.gather(*(self._model_table(tag) for tag in with_fine_tunes), return_exceptions=True)
        devices = ", ".join(f"{tag} on {_device_of(d)}" for tag, d in zip(self._describe, described))
        first = self.config.ports[0]
        logger.info(
            "Fleet ready: %s; %s. Connect a robot: clients.PolicyClient(host=%r, port=%d), "
            "or try `python -m clients.example --port %d`.",
            endpoints, devices, self.config.host, first.port, first.port,
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
            received = time.time()
            task = asyncio.get_running_loop().create_task(self._answer(sock, port, token, frames, received))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _answer(self, sock, port: PortConfig, token: str | None, frames: list[zmq.Frame], received: float) -> None:
        # A REQ robot's request arrives as [identity, b"", body]; the reply must go back the same way.
        if len(frames) < 3 or frames[-2].bytes != b"":
            return  # not a REQ peer; there is no envelope to answer on
        call = _Call(port.embodiment)
        try:
            reply = await self._respond(call, port, token, frames[-1].buffer, received)
        except RequestError as exc:
            reply, call.outcome = error_reply(str(exc), exc.kind), exc.kind.value
        except Exception as exc:  # a bug of ours must still reach the robot as an answer
            logger.exception("Unexpected error answering a request on port %d", port.port)
            reply = error_reply(f"internal error: {type(exc).__name__}: {exc}", ErrorKind.INTERNAL)
            call.outcome = ErrorKind.INTERNAL.value
        t0 = time.perf_counter()
        try:
            payload = packb(reply, call.encoding or ArrayEncoding.NPY)
        except Exception as exc:
            payload = packb(error_reply(f"internal error: reply could not be encoded: {exc}", ErrorKind.INTERNAL))
            call.outcome = ErrorKind.INTERNAL.value
        encoded = time.perf_counter()
        self._metrics.request(call.embodiment, call.endpoint, call.outcome)
        if call.model is not None:
            self._metrics.model_request(call.embodiment, call.model, call.outcome)
        if call.endpoint == "get_action":
            self._metrics.slo(call.embodiment, port.port, slo_outcome(call.outcome, reply))
        await sock.send_multipart([frames[0], b"", payload], copy=False)
        if call.traced:
            self._hops.add(encoded - t0, time.perf_counter() - encoded)

    async def _respond(self, call: "_Call", port: PortConfig, token: str | None, body, received: float) -> Any:
        try:
            msg, call.encoding = unpackb_with_encoding(body, self._limits)
        except CodecError as exc:
            raise RequestError(f"request: {exc}") from None
        env = parse_envelope(msg)
        call.endpoint = env.endpoint
        if token is not None and not hmac.compare_digest((env.api_token or "").encode(), token.encode()):
            raise RequestError(UNAUTHORIZED, ErrorKind.UNAUTHORIZED)
        tag = self.router.resolve(env.embodiment_tag or port.embodiment)
        call.embodiment = tag
        if env.endpoint == "get_action":
            return await self._get_action(call, port, tag, env, received)
        if env.endpoint == "ping":
            return {"status": "ok", "message": "Server is running", "embodiment_tag": tag}
        if env.endpoint == "get_modality_config":
            model = await self._choose_model(tag, port, env.model_id)
            if (tag, model) not in self._modality:
                handle = self._model_handle(tag, model)
                self._modality[(tag, model)] = _Once(lambda: handle.modality_config.remote())
            configs = await self._modality[(tag, model)].get()
            return modality_config_n15(configs) if port.port_protocol is PortProtocol.N15 else configs
        if env.endpoint == "reset":
            options = parse_options(env.data.get("options"))
            model = await self._choose_model(tag, port, _pop_model_id(options, env.model_id))
            return await self._model_handle(tag, model).reset.remote(options)
        if env.endpoint == "info":
            return await self._info(port)
        if env.endpoint == "kill":
            raise RequestError(KILL_REFUSED, ErrorKind.REFUSED)
        raise RequestError(f"endpoint: {env.endpoint!r} is not served")  # parse_envelope lets only known ones through

    async def _get_action(self, call: "_Call", port: PortConfig, tag: str, env, received: float) -> Any:
        req = parse_action_request(env.data, port.port_protocol)
        decoded = time.time()
        if not 1 <= req.samples <= self.config.max_batch_per_request:
            raise RequestError(
                f"observation: expected a batch size B from 1 to {self.config.max_batch_per_request}, got {req.samples}"
            )
        options, asked = (dict(req.options) if req.options is not None else None), None
        model = await self._choose_model(tag, port, _pop_model_id(options, env.model_id))
        call.model = model
        if options is not None and "trace" in options:
            call.traced = bool(options.pop("trace"))  # ours, not the policy's: bench.hops asks for the hops
        if options is not None and "deadline_ms" in options:
            asked = options.pop("deadline_ms")  # ours, not the policy's
            if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not asked > 0:
                raise RequestError(f"options.deadline_ms: expected a positive number of milliseconds, got {asked!r:.40}")
        budget_ms = self.admission[tag].deadline_ms(asked, port.slo_ms)
        # The robot's clock started before ours and stops after the reply crosses the network: the scheduler
        # aims a little before the deadline, so an action it delivers is still on time where the robot is.
        margin_s = min(DELIVERY_MARGIN_S, 0.1 * budget_ms / 1000.0)
        delivered = await self._batcher(tag, model).submit(
            InferenceRequest(req.observation, options, req.samples), received, received + budget_ms / 1000.0 - margin_s
        )
        outcome = delivered.outcome
        if outcome.error is not None:
            raise RequestError(outcome.error, outcome.error_kind or ErrorKind.POLICY)
        total_ms = (time.time() - received) * 1000.0
        self._metrics.action(tag, delivered.batch_size, delivered.queue_ms, delivered.infer_ms, total_ms,
                             delivered.predicted_ms)
        info = dict(outcome.info)
        info["server"] = {
            "batch_size": delivered.batch_size,
            "embodiment_tag": tag,
            "model_id": model,
            "replica": delivered.replica,
            "queue_ms": round(delivered.queue_ms, 3),
            "infer_ms": round(delivered.infer_ms, 3),
            "deadline_ms": round(budget_ms, 3),
            "total_ms": round(total_ms, 3),
        }
        if call.traced and delivered.trace is not None:
            info["server"]["trace"] = {"recv": received, "decoded": decoded, **delivered.trace, "reply": time.time()}
        return format_action_reply(req, outcome.action, info)

    async def _info(self, port: PortConfig) -> dict[str, Any]:
        tags = self.router.tags
        described = await asyncio.gather(*(self._describe[t].get() for t in tags))
        tables = await asyncio.gather(*(self._model_table(t) for t in tags))
        embodiments = {}
        for tag, desc, table in zip(tags, described, tables):
            where = self._resident[tag]
            where.prune(self._running.get(tag))  # replicas gone since (scaled down, restarted) drop out
            desc = dict(desc)
            # Each model, its source, and the replicas holding it (as each running replica last reported).
            desc["models"] = {name: {**src, "replicas": where.holding(name)} for name, src in table["served"].items()}
            desc["max_models_per_replica"] = table["max_models_per_replica"]
            desc["cold_load_ms_by_preset"] = table["cold_load_ms_by_preset"]
            embodiments[tag] = desc
        reply = {"default_embodiment": port.embodiment, "embodiments": embodiments, "version": VERSION}
        if port.model is not None:
            reply["default_model"] = port.model
        return reply

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_S)
            self._metrics.flush()
            depth: dict[str, int] = {}
            for (tag, _), b in self.batchers.items():
                depth[tag] = depth.get(tag, 0) + b.queued
            for tag, n in depth.items():
                self._metrics.sink.queue_depth.set(n, tags={"embodiment": tag})

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
                        self._running[tag] = deployments[name].replica_states.get("RUNNING", 0)
                for tag, pool in self.pools.items():
                    pool.set_replicas(self._running.get(tag, 1))
                # Replicas with work to do, over every embodiment: the replicas share the cores by this count.
                busy_tags = {tag for (tag, _), b in self.batchers.items() if b.demand_samples_per_s() > 0}
                busy = sum(self._running.get(tag, 1) for tag in busy_tags)
                for pool in self.pools.values():
                    pool.fleet_load["busy_replicas"] = float(max(1, busy))
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
            "ports": [{"address": f"tcp://{self.config.host}:{p.port}", "embodiment": p.embodiment, "protocol": p.protocol}
                      for p in self.config.ports],
            "embodiments": {b.tag: b.stats() for b in self.batchers.values()},
            "models": {f"{tag}/{model}": counts.status() for (tag, model), counts in self._model_counts.items()},
            "open_requests": len(self._handlers),
            "robots_connected": {str(p): n for p, n in self._robots.items()},
            "rss_mb": _rss_mb(),
            "reply_hops": self._hops.status(),
            "version": VERSION,
        }

    def check_health(self) -> None:
        for task in self._loops:
            if task.done():
                raise RuntimeError(f"ingress task {task.get_name()} stopped: {task.exception() if not task.cancelled() else 'cancelled'}")
        for b in self.batchers.values():
            if not b.alive:
                raise RuntimeError(f"ingress batcher of {b.tag!r} stopped")

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
