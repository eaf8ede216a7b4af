"""A policy replica: loads one embodiment's checkpoint once and answers batches of requests.

The ingress sends one call per batch; `@serve.batch` merges calls that arrive while a forward pass runs
(from several ingresses, or from one that is ahead of us), and the merged requests are cut into forward
passes of at most `max_batch_size` samples. The forward pass runs in a worker thread so the replica's event
loop keeps accepting calls (and health checks) meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from ray import serve

from serving.config import BatchingConfig, PolicyConfig
from serving.messages import BatchReply, InferenceOutcome, InferenceRequest
from serving.cores import FreeCores
from serving.scheduler import ForwardTimeModel

# The ingress's demand report rides on every batch; older than this, the embodiment is idle (autoscaling
# sees no demand and scales down).
LOAD_STALE_S = 5.0

logger = logging.getLogger("ray.serve")


def _chunks(requests: list[InferenceRequest], max_samples: int) -> list[list[InferenceRequest]]:
    """Cut into consecutive runs of at most `max_samples` samples; one request is never split."""
    out: list[list[InferenceRequest]] = []
    run: list[InferenceRequest] = []
    size = 0
    for r in requests:
        if run and size + r.samples > max_samples:
            out.append(run)
            run, size = [], 0
        run.append(r)
        size += r.samples
    if run:
        out.append(run)
    return out


class DeadlineExceeded(Exception):
    pass


_EXPIRED = DeadlineExceeded("deadline exceeded before its forward pass")


def _outcome(result: Any) -> InferenceOutcome:
    if isinstance(result, DeadlineExceeded):
        return InferenceOutcome(None, {}, f"deadline exceeded: {result}", "deadline")
    if not isinstance(result, BaseException):
        return InferenceOutcome(result[0], result[1])
    if isinstance(result, ValueError):  # PolicyInputError and friends: the message names the field
        return InferenceOutcome(None, {}, str(result), "bad_request")
    return InferenceOutcome(None, {}, f"policy error: {type(result).__name__}: {result}", "policy")


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64, health_check_period_s=5)
class PolicyDeployment:
    def __init__(self, tag: str, checkpoint: str, config: PolicyConfig):
        import policy  # torch and transformers load here, in the replica, not in the ingress

        self.tag = tag
        path = Path(checkpoint)
        if config.demo_preset is None and config.backend == "native" and not (path / "config.json").is_file():
            # Before torch loads (seconds per try): a wrong path is the most common config mistake.
            raise FileNotFoundError(f"checkpoint for {tag!r}: not a checkpoint directory: {path} (no config.json)")
        if config.demo_preset is not None and not (path / "config.json").exists():
            logger.info("Building the %r demo checkpoint for %s at %s (offline, once)", config.demo_preset, tag, path)
            policy.ensure_demo_checkpoint(path, config.demo_preset, embodiments=(tag,))
        import torch

        self._torch = torch
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        device = _resolve_device(config.device)
        # No torch_threads given, on a CPU: use the cores the other busy replicas leave free (see _threads_for).
        self._adaptive_threads = not config.torch_threads and device == "cpu"
        self._cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._free_cores = FreeCores(self._cores)
        self._load: dict[str, float] = {}
        self._load_at = 0.0
        self._inflight_samples = 0
        self.model = ForwardTimeModel()
        self.policy = policy.load_policy(
            str(path), tag, device=device, strict=config.strict, backend=config.backend, dtype=config.dtype
        )
        self.batching = BatchingConfig()  # until reconfigure() applies the deployment's user_config
        self._replica = serve.get_replica_context().replica_id.unique_id
        logger.info("Policy %s ready on %s from %s", tag, device, path)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.batching = BatchingConfig(**(user_config or {}))
        self._merge.set_max_batch_size(self.batching.max_batch_size)

    async def infer(self, requests: list[InferenceRequest], load: dict[str, float] | None = None) -> BatchReply:
        """One batch from an ingress; `load` is its demand report (serving.batcher.EmbodimentBatcher.load)."""
        if load:
            self._load, self._load_at = load, time.time()
        samples = sum(r.samples for r in requests)
        self._inflight_samples += samples
        try:
            return await self._merge(requests)
        finally:
            self._inflight_samples -= samples

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

    def _threads_for(self) -> int:
        """Torch threads for the next forward pass: the cores free on this node, within this replica's share.

        Ray gives an actor below one CPU one OpenMP thread; a replica alone on a 2-core machine would leave a
        core idle at one robot. The ingress reports how many replicas run busy deployments (`busy_replicas`);
        each may take an equal share of the cores, and of that only what other processes leave idle
        (serving/cores.py), so a second replica, or anything else busy on the node, gets its core back.
        """
        busy = int(self._current_load().get("busy_replicas", 1) or 1)
        share = max(1, self._cores // max(1, busy))
        threads = self._free_cores.threads(share)
        return self._torch.get_num_threads() if threads is None else threads

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _merge(self, calls: list[list[InferenceRequest]]) -> list[BatchReply]:
        flat = [r for call in calls for r in call]
        outcomes: list[InferenceOutcome] = []
        timings: list[dict[str, float]] = []
        for chunk in _chunks(flat, self.batching.max_batch_size):
            o, t = await asyncio.to_thread(self._forward, chunk)
            outcomes += o
            timings += t
        replies, start = [], 0
        for call in calls:
            end = start + len(call)
            replies.append(
                BatchReply(outcomes[start:end], self._replica, self.batching.max_batch_size, self.batching.batch_wait_ms,
                           timings[start:end])
            )
            start = end
        return replies

    def _forward(self, chunk: list[InferenceRequest]) -> tuple[list[InferenceOutcome], list[dict[str, float]]]:
        if self._adaptive_threads:
            threads = self._threads_for()
            if threads != self._torch.get_num_threads():
                self._torch.set_num_threads(threads)
        started = time.time()
        t0 = time.perf_counter()
        # A request whose robot has already been told "deadline exceeded" is not worth a forward pass.
        live = [i for i, r in enumerate(chunk) if r.deadline is None or r.deadline > started]
        results: list[Any] = [_EXPIRED] * len(chunk)
        try:
            computed = (
                self.policy.get_actions([(chunk[i].observation, chunk[i].options) for i in live], return_exceptions=True)
                if live else []
            )
        except Exception as exc:  # a failure of the forward pass itself reaches every request in it
            computed = [exc] * len(live)
        for i, res in zip(live, computed):
            results[i] = res
        infer_ms = (time.perf_counter() - t0) * 1000.0
        batch_size = sum(r.samples for r, res in zip(chunk, results) if not isinstance(res, BaseException))
        outcomes = [_outcome(res) for res in results]
        timing = {"forward_start": started, "infer_ms": infer_ms, "batch_size": float(batch_size)}
        if batch_size:
            self.model.observe(batch_size, infer_ms)
        return outcomes, [timing] * len(chunk)

    def describe(self) -> dict[str, Any]:
        return self.policy.describe()

    def modality_config(self) -> dict[str, Any]:
        return self.policy.get_modality_config()

    def reset(self, options: dict[str, Any] | None) -> dict[str, Any]:
        return self.policy.reset(options)
