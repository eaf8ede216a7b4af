"""A policy replica: loads one embodiment's checkpoint once and answers batches of requests.

Besides that default model, a replica serves the embodiment's fine-tunes: each call names one with Serve's
multiplexed model id (set by the ingress, one id per batch), which loads it on first use and keeps the
`max_models_per_replica` most recently used (Serve's `@serve.multiplexed`, which also routes a model's
requests to the replicas that hold it). The set of fine-tunes follows the deployment's user_config live.

The ingress sends one call per batch; the replica's pass queue (`serving.passes`) runs it at once when the
replica is idle, and merges calls that arrive while a forward pass runs into the next one. The forward pass
runs in a worker thread so the replica's event loop keeps accepting calls (and health checks) meanwhile.

Replicas only load checkpoints: demo checkpoints are built where the app is built (`serving.app`), or with
`python -m serving.demo_checkpoints` for ones added live through user_config.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from clients.protocol import Refusal
from serving.config import (
    DEFAULT_CHECKPOINT_ROOT,
    DEFAULT_MODEL,
    BatchingConfig,
    ModelSource,
    PolicyConfig,
    PolicyUserConfig,
    layout_mismatch,
    missing_demo_checkpoint,
    resolve_model_source,
)
from serving.cores import FreeCores, ThreadChoice
from serving.messages import BatchReply, ForwardPass, InferenceOutcome, InferenceRequest
from serving.metrics import ModelMetrics
from serving.passes import PassQueue
from serving.planning import ForwardTimeModel

# The ingress's demand report rides on every batch; older than this, the embodiment is idle (autoscaling
# sees no demand and scales down).
LOAD_STALE_S = 5.0

logger = logging.getLogger("ray.serve")


class DeadlineExceeded(Exception):
    pass


_EXPIRED = DeadlineExceeded("deadline exceeded before its forward pass")


def _outcome(result: Any) -> InferenceOutcome:
    if isinstance(result, DeadlineExceeded):
        return InferenceOutcome(None, {}, f"deadline exceeded: {result}", "deadline", Refusal.EXPIRED_ON_REPLICA.value)
    if not isinstance(result, BaseException):
        return InferenceOutcome(result[0], result[1])
    if isinstance(result, ValueError):  # PolicyInputError and friends: the message names the field
        return InferenceOutcome(None, {}, str(result), "bad_request")
    return InferenceOutcome(None, {}, f"policy error: {type(result).__name__}: {result}", "policy")


class UnknownModel(LookupError):
    """A model name this embodiment does not serve (the robot's mistake, or a model removed from the config)."""


# A checkpoint that failed to load fails the same way for a while: answer its requests with that error
# instead of reading the files again for every batch.
LOAD_FAILURE_TTL_S = 5.0


class _LoadedModel:
    """What Serve's multiplexer caches: one fine-tune's policy. Serve calls __del__ when it evicts it."""

    def __init__(self, name: str, source: ModelSource, policy: Any, load_ms: float, on_evict):
        self.name, self.source, self.policy, self.load_ms = name, source, policy, load_ms
        self._on_evict = on_evict
        self._loop = asyncio.get_running_loop()

    def __del__(self) -> None:
        if self.policy is not None:  # once: Serve's eviction call, or garbage collection, whichever comes first
            self.policy = None  # batches in flight hold their own reference; the memory goes with the last
            try:  # Serve calls this from an executor thread: the replica's bookkeeping stays on its loop
                self._loop.call_soon_threadsafe(self._on_evict, self)
            except RuntimeError:  # the loop is closed: the replica is shutting down
                pass


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64, health_check_period_s=5)
class PolicyDeployment:
    def __init__(
        self,
        tag: str,
        checkpoint: str,
        config: PolicyConfig,
        models: dict[str, dict[str, Any]] | None = None,
        max_models_per_replica: int = 4,
        checkpoint_root: str = DEFAULT_CHECKPOINT_ROOT,
    ):
        import policy  # torch and transformers load here, in the replica, not in the ingress

        self.tag = tag
        path = Path(checkpoint)
        # Before torch loads (seconds per try): a wrong path is the most common config mistake.
        missing = missing_demo_checkpoint(tag, ModelSource(checkpoint=str(path), demo_preset=config.demo_preset))
        if missing:
            raise FileNotFoundError(missing)
        if config.demo_preset is None and config.backend == "native" and not (path / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint for {tag!r}: not a checkpoint directory: {path} (no config.json)")
        import torch

        self._torch = torch
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self._config = config
        # "auto" warns when a GPU is there but torch cannot use it; "cuda:N" counts this replica's GPUs only
        # (Ray sets CUDA_VISIBLE_DEVICES from num_gpus). load_policy warms the model up (one B=1 forward), so
        # the first robot does not pay for CUDA / cuBLAS initialisation.
        self._device = device = policy.resolve_device(config.device)
        # No torch_threads given, on a CPU: use the cores the other busy replicas leave free (see _threads_for).
        self._adaptive_threads = not config.torch_threads and device == "cpu"
        self._cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._free_cores = FreeCores(self._cores)
        self._load: dict[str, float] = {}
        self._load_at = 0.0
        self._inflight_samples = 0
        self.model = ForwardTimeModel()  # every pass: the speed the router weighs this replica by
        self._thread_choice = ThreadChoice()
        self._passes = PassQueue(self._forward)
        t0 = time.perf_counter()
        self.policy = policy.load_policy(str(path), tag, device=device, **self._load_kwargs())
        self._gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if device.startswith("cuda") and not self._gpu_ids:
            logger.warning(
                "Policy %s runs on %s but Ray assigned this replica no GPU (no num_gpus in its ray_actor_options): "
                "Ray does not account for its GPU memory, and replicas may pile onto one GPU", tag, device,
            )
        self.batching = BatchingConfig()  # until reconfigure() applies the deployment's user_config
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._checkpoint_root = checkpoint_root
        self._reference = ModelSource(checkpoint=str(path), demo_preset=config.demo_preset)
        self._base_models = {name: ModelSource(**src) for name, src in (models or {}).items()}
        self._models: dict[str, ModelSource] = dict(self._base_models)  # the live set, see reconfigure()
        self._resident: dict[str, _LoadedModel] = {}
        self._failures: dict[str, tuple[float, Exception]] = {}
        self._loads: dict[str, int] = {}  # completed loads per model on this replica
        self._metrics = ModelMetrics()
        self._cold_load_ms: dict[str, float] = {DEFAULT_MODEL: (time.perf_counter() - t0) * 1000.0}
        self._max_models = max_models_per_replica

        async def _load_fine_tune(model_id: str) -> _LoadedModel:
            return await self._load_model(model_id)

        # Decorated here, not on the class, because the limit is configuration (init args).
        self._fine_tune = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(_load_fine_tune)
        # What loaded so far (torch, the model, Ray) lives as long as the replica: out of the collector's sight,
        # so a full collection does not walk millions of objects in the middle of a robot's request.
        gc.freeze()
        logger.info("Policy %s ready on %s (Ray GPU ids %s) from %s", tag, device, self._gpu_ids or "none", path)

    def _load_kwargs(self) -> dict[str, Any]:
        """How every model of this replica loads (the default one and each fine-tune alike)."""
        cfg = self._config
        kwargs: dict[str, Any] = {"strict": cfg.strict, "backend": cfg.backend, "dtype": cfg.dtype,
                                  "tokenizer": cfg.tokenizer, "backbone_config": cfg.backbone_config}
        if cfg.compile != "none":
            kwargs["compile"] = cfg.compile
        return kwargs

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = PolicyUserConfig(**(user_config or {}))
        self.batching = cfg.batching()
        self._passes.max_batch_size = self.batching.max_batch_size
        if cfg.models is None:
            self._models = dict(self._base_models)
        else:
            self._models = {n: resolve_model_source(s, self.tag, self._checkpoint_root) for n, s in cfg.models.items()}
        # A model whose source changed must not be answered from a stale failure.
        self._failures = {n: f for n, f in self._failures.items() if n in self._models}

    # -- models ----------------------------------------------------------------------------------------------

    def _served_names(self) -> list[str]:
        return [DEFAULT_MODEL, *sorted(self._models)]

    async def _policy_for(self, name: str) -> Any:
        """The policy of model `name` ("" or "default": the embodiment's own), loading it if needed."""
        if not name or name == DEFAULT_MODEL:
            return self.policy
        if name not in self._models:  # checked before the cache: a removed model is refused at once
            raise UnknownModel(
                f"model_id: {name!r:.80} is not served for {self.tag!r}; served: {', '.join(self._served_names())}"
            )
        for _ in range(2):  # evicted between its load and now (a burst of other models): load it again
            loaded = await self._fine_tune(name)
            if loaded.policy is not None:
                return loaded.policy
        raise RuntimeError(f"model {name!r} was evicted as soon as it loaded; raise max_models_per_replica")

    async def _load_model(self, name: str) -> _LoadedModel:
        failed = self._failures.get(name)
        if failed is not None and time.monotonic() - failed[0] < LOAD_FAILURE_TTL_S:
            raise failed[1]
        source = self._models[name]
        try:
            mismatch = layout_mismatch(self.tag, self._reference, source)
            if mismatch:
                raise ValueError(mismatch)
            policy, load_ms = await asyncio.to_thread(self._build, source)
        except Exception as exc:
            self._failures[name] = (time.monotonic(), exc)
            self._metrics.load(self.tag, name, "error")
            raise
        self._failures.pop(name, None)
        self._cold_load_ms[name] = load_ms
        self._loads[name] = self._loads.get(name, 0) + 1
        loaded = _LoadedModel(name, source, policy, load_ms, self._evicted)
        self._resident[name] = loaded
        self._metrics.load(self.tag, name, "ok", load_ms, self._preset(source))
        self._metrics.resident(self.tag, len(self._resident))
        return loaded

    def _build(self, source: ModelSource) -> tuple[Any, float]:
        """Load one fine-tune; the load alone is timed: the cold-load cost."""
        import policy

        path = Path(source.checkpoint or "")
        missing = missing_demo_checkpoint(self.tag, source)
        if missing:
            raise FileNotFoundError(missing)
        t0 = time.perf_counter()
        loaded = policy.load_policy(str(path), self.tag, device=self._device, **self._load_kwargs())
        return loaded, (time.perf_counter() - t0) * 1000.0

    @staticmethod
    def _preset(source: ModelSource) -> str:
        return source.demo_preset or "checkpoint"

    def _evicted(self, loaded: _LoadedModel) -> None:
        if self._resident.get(loaded.name) is loaded:  # not a newer copy loaded again since
            del self._resident[loaded.name]
        self._metrics.evicted(self.tag, loaded.name)
        self._metrics.resident(self.tag, len(self._resident))

    def models(self) -> dict[str, Any]:
        """This replica's view: the models served, those resident here (least recently used first), cold loads."""
        by_preset: dict[str, float] = {}
        sources = {DEFAULT_MODEL: self._reference, **self._models}
        for name, ms in self._cold_load_ms.items():
            preset = self._preset(sources[name]) if name in sources else "checkpoint"
            by_preset[preset] = max(by_preset.get(preset, 0.0), ms)
        return {
            "replica": self._replica,
            "served": {name: src.model_dump(exclude_none=True) for name, src in sources.items()},
            "resident": [DEFAULT_MODEL, *self._resident],
            "max_models_per_replica": self._max_models,
            "cold_load_ms": {name: round(ms, 1) for name, ms in self._cold_load_ms.items()},
            # What a deadline-aware scheduler adds for a model not resident anywhere (the slowest load seen).
            "cold_load_ms_by_preset": {p: round(ms, 1) for p, ms in by_preset.items()},
        }

    def _refused(self, requests: list[InferenceRequest], message: str, kind: str) -> BatchReply:
        return BatchReply(
            [InferenceOutcome(None, {}, message, kind) for _ in requests], self._replica, self.batching.max_batch_size,
            self.batching.batch_wait_ms, models_resident=[DEFAULT_MODEL, *self._resident],
        )

    # -- inference -------------------------------------------------------------------------------------------

    async def infer(self, requests: list[InferenceRequest], load: dict[str, float] | None = None) -> BatchReply:
        """One batch from an ingress (of one model: the multiplexed id); `load` is its demand report
        (serving.scheduler.EmbodimentScheduler.load)."""
        entered = time.time()
        if load:
            self._load, self._load_at = load, entered
        name = serve.get_multiplexed_model_id()
        loads_before = self._loads.get(name, 0)
        try:
            policy = await self._policy_for(name)
        except UnknownModel as exc:
            return self._refused(requests, str(exc), "bad_request")
        except Exception as exc:  # this model's requests fail with the loader's error; the others go on
            return self._refused(requests, f"model {name!r} failed to load: {type(exc).__name__}: {exc}", "policy")
        samples = sum(r.samples for r in requests)
        self._inflight_samples += samples
        try:
            share = await self._passes.run(policy, requests)
        finally:
            self._inflight_samples -= samples
        reply = BatchReply(share.outcomes, self._replica, self.batching.max_batch_size, self.batching.batch_wait_ms,
                           share.passes, share.pass_of, models_resident=[DEFAULT_MODEL, *self._resident])
        if self._loads.get(name, 0) != loads_before:  # this call waited on a cold load of its model
            reply.cold_load_ms = self._cold_load_ms.get(name, 0.0)
        reply.trace = {"replica_in": entered, "batch_in": share.taken, "replica_out": time.time()}
        return reply

    def _current_load(self) -> dict[str, float]:
        return self._load if time.time() - self._load_at < LOAD_STALE_S else {}

    def record_routing_stats(self) -> dict[str, float]:
        """What serving.routing.SampleBalancedRouter weighs replicas by (Serve polls it)."""
        return {"inflight_samples": float(self._inflight_samples), "fixed_ms": self.model.fixed_ms,
                "per_sample_ms": self.model.per_sample_ms}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What serving.autoscaling.slo_autoscaling_policy scales on: the ingress's latest demand report."""
        load = self._current_load()
        return {
            "replicas_needed": float(load.get("replicas_needed", 0.0)),
            "demand_samples_per_s": float(load.get("demand_samples_per_s", 0.0)),
            "queued_samples": float(load.get("queued_samples", 0.0)),
            "inflight_samples": float(self._inflight_samples),
        }

    def _threads_for(self, samples: int) -> int:
        """Torch threads for a pass of `samples`: at most the cores free on this node within this replica's share,
        and of one thread or that many, whichever measured faster at this batch size (serving/cores.py).

        Ray gives an actor below one CPU one OpenMP thread; a replica alone on a 2-core machine would leave a
        core idle at one robot. The ingress reports how many replicas run busy deployments (`busy_replicas`);
        each may take an equal share of the cores, and of that only what other processes leave idle, so a second
        replica, or anything else busy on the node, gets its core back.
        """
        busy = int(self._current_load().get("busy_replicas", 1) or 1)
        share = max(1, self._cores // max(1, busy))
        most = self._free_cores.threads(share)
        return self._thread_choice.choose(samples, self._torch.get_num_threads() if most is None else most)

    def _forward(self, policy: Any, chunk: list[InferenceRequest]) -> tuple[list[InferenceOutcome], ForwardPass]:
        """One forward pass, in the pass queue's worker thread."""
        threads = self._torch.get_num_threads()
        if self._adaptive_threads:
            wanted = self._threads_for(sum(r.samples for r in chunk))
            if wanted != threads:
                self._torch.set_num_threads(wanted)
                threads = wanted
        started = time.time()
        t0 = time.perf_counter()
        # A request whose robot has already been told "deadline exceeded" is not worth a forward pass.
        live = [i for i, r in enumerate(chunk) if r.deadline is None or r.deadline > started]
        results: list[Any] = [_EXPIRED] * len(chunk)
        try:
            computed = (
                policy.get_actions([(chunk[i].observation, chunk[i].options) for i in live], return_exceptions=True)
                if live else []
            )
        except Exception as exc:  # a failure of the forward pass itself reaches every request in it
            computed = [exc] * len(live)
        for i, res in zip(live, computed):
            results[i] = res
        infer_ms = (time.perf_counter() - t0) * 1000.0
        batch_size = sum(r.samples for r, res in zip(chunk, results) if not isinstance(res, BaseException))
        if batch_size:
            self.model.observe(batch_size, infer_ms)
            self._thread_choice.observe(batch_size, threads, infer_ms)
        return [_outcome(res) for res in results], ForwardPass(started, infer_ms, batch_size, threads)

    def describe(self) -> dict[str, Any]:
        out = self.policy.describe()
        out.setdefault("model", {})["ray_gpu_ids"] = list(self._gpu_ids)  # the machine's ids of this replica's GPUs
        return out

    async def modality_config(self) -> dict[str, Any]:
        return (await self._policy_for(serve.get_multiplexed_model_id())).get_modality_config()

    async def reset(self, options: dict[str, Any] | None) -> dict[str, Any]:
        return (await self._policy_for(serve.get_multiplexed_model_id())).reset(options)
