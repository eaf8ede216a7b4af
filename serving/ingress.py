"""The ZMQ ingress deployment: unmodified GR00T robots (REQ sockets) in, policy deployments out.

It wires the parts together and runs what is periodic; each part lives in a module of its own:
`serving.transport` (sockets, CURVE, frames), `serving.endpoints` (what each request asks, answered),
`serving.models` (embodiments, fine-tunes, where each is loaded), `serving.scheduler` (one per embodiment: the
queue, batches and deadlines), `serving.status` (the HTTP status page). README.md, "How a request flows",
follows one get_action through them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from importlib import metadata
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.config import LOW_LATENCY_ENV_VARS, AdmissionConfig, IngressConfig, PortConfig
from serving.endpoints import Endpoints
from serving.messages import BatchReply, InferenceRequest
from serving.metrics import FleetMetrics, MetricsBuffer
from serving.models import ModelRegistry
from serving.scheduler import EmbodimentScheduler
from serving.status import status_page
from serving.transport import ZmqTransport

logger = logging.getLogger("ray.serve")

try:
    VERSION = metadata.version("fleetserve")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0+unknown"

METRICS_FLUSH_S = 1.0
REPLICA_WATCH_S = 2.0


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
        self.registry: ModelRegistry[DeploymentHandle] = ModelRegistry(handles, models)
        # One scheduler per embodiment, for all its models (a batch never mixes models; the queue spans them).
        self.schedulers = {
            tag: EmbodimentScheduler(
                tag, self._sender(tag), policy=config.scheduler, max_inflight=config.max_inflight_batches,
                max_queued=admission[tag].max_queued_requests,
                holds_model=lambda model, tag=tag: self.registry.holds(tag, model))
            for tag in self.registry.tags
        }
        self.registry.on_cold_load = lambda tag, ms: self.schedulers[tag].seed_cold_load(ms)
        self._running: dict[str, int] = {}  # RUNNING replicas per embodiment, from Serve's status (_watch_replicas)
        self._metrics = MetricsBuffer(FleetMetrics())
        self.endpoints = Endpoints(config, admission, self.registry, self.schedulers, self._metrics, self._info)
        self.transport = ZmqTransport(config, self.endpoints.handle, self._robots_changed)
        loop = asyncio.get_running_loop()
        self.transport.start()
        self._background = [loop.create_task(self._flush_metrics(), name="metrics"),
                            loop.create_task(self._watch_replicas(), name="replicas"),
                            loop.create_task(self._announce_when_ready(), name="announce")]
        gc.freeze()  # Ray's and our start-up objects stay for good: no full collection walks them mid-request

    def _sender(self, tag: str):
        """The scheduler's way out: one `infer` call per batch, to the replicas of the batch's model."""
        registry = self.registry

        async def replied(model: str, requests: int, response) -> BatchReply:
            reply = await response
            registry.note_reply(tag, model, requests, reply)
            return reply

        def send(model: str, requests: list[InferenceRequest], load: dict[str, float]):
            # .remote() hands the call to Serve's router now; the coroutine only awaits its reply.
            return replied(model, len(requests), registry.batch_handle(tag, model).infer.remote(requests, load))

        return send

    def _robots_changed(self, port: int, robots: int) -> None:
        self._metrics.sink.robots.set(robots, tags={"port": str(port)})

    async def _announce_when_ready(self) -> None:
        """One log line, once every policy answers, telling the user how to connect a robot."""
        endpoints = self.transport.endpoints()
        logger.info("ZMQ ingress listening on %s; waiting for the policies to load", endpoints)
        try:
            described = await asyncio.gather(*(self.registry.describe(tag) for tag in self.registry.tags))
        except Exception as exc:
            logger.error("A policy failed to load, see its deployment in `serve status`: %s", exc)
            return
        # Embodiments with fine-tunes: the replicas' load times, so a first cold load is predicted too.
        await asyncio.gather(*(self.registry.table(tag) for tag in self.registry.with_fine_tunes()),
                             return_exceptions=True)
        devices = ", ".join(f"{tag} on {_device_of(d)}" for tag, d in zip(self.registry.tags, described))
        first = self.config.ports[0]
        logger.info(
            "Fleet ready: %s; %s. Connect a robot: clients.PolicyClient(host=%r, port=%d), "
            "or try `python -m clients.example --port %d`.",
            endpoints, devices, self.config.host, first.port, first.port,
        )

    async def _info(self, port: PortConfig) -> dict[str, Any]:
        tags = self.registry.tags
        described = await asyncio.gather(*(self.registry.describe(t) for t in tags))
        tables = await asyncio.gather(*(self.registry.table(t) for t in tags))
        embodiments = {}
        for tag, desc, table in zip(tags, described, tables):
            where = self.registry.resident[tag]
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
            for tag, scheduler in self.schedulers.items():
                self._metrics.sink.queue_depth.set(scheduler.queued, tags={"embodiment": tag})

    async def _watch_replicas(self) -> None:
        """Tell each scheduler how many replicas its deployment runs (Serve's status), so it keeps every replica
        busy, including one autoscaling just added; and how many replicas have work, over every embodiment."""
        names = {tag: self.registry.deployment(tag).deployment_name for tag in self.registry.tags}
        app = serve.get_replica_context().app_name
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[app].deployments
                for tag, name in names.items():
                    if name in deployments:
                        self._running[tag] = deployments[name].replica_states.get("RUNNING", 0)
                busy = sum(self._running.get(tag, 1) for tag, s in self.schedulers.items() if s.demand_samples_per_s() > 0)
                for tag, scheduler in self.schedulers.items():
                    scheduler.observe_replicas(self._running.get(tag, 1))
                    scheduler.observe_fleet(busy)
            except Exception as exc:  # the controller restarting: the schedulers keep what they knew
                logger.debug("replica count unavailable: %s", exc)
            await asyncio.sleep(REPLICA_WATCH_S)

    async def __call__(self, request) -> dict[str, Any]:
        """HTTP status page (the Serve proxy's route): where robots connect and how the queues look."""
        return status_page(self.config, self.schedulers, self.registry, self.transport, self.endpoints, VERSION)

    def check_health(self) -> None:
        self.transport.check_health()

    async def __del__(self) -> None:
        # Graceful shutdown: stop taking requests, answer the ones in flight, then close the sockets.
        self.transport.stop_receiving()
        for t in self._background:
            t.cancel()
        await self.transport.drain()
        for scheduler in self.schedulers.values():
            await scheduler.close()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.transport.close()
