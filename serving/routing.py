"""Serve request router for the policy deployments: balance samples, not calls.

Serve's default router balances calls, so closed-loop robots answered together come back together and two
replicas run lopsided batches (one of 14, one of 2). Here each batch goes to the replica with the least
predicted work: the samples it has in flight times its time per sample, plus its fixed cost per pass. The
samples in flight are counted by this router itself (exact for its own calls, no lag) and by the replica
(`record_routing_stats`: every caller's calls, a poll behind); the larger of the two counts. Multiplexed
model ids are honoured first (Serve's MultiplexMixin: replicas holding the model, then those holding the
fewest), so per-model handles keep their affinity.

Configured per deployment in serve_config.yaml:
    request_router_config:
      request_router_class: serving.routing:SampleBalancedRouter
      request_routing_stats_period_s: 0.5
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


def batch_samples(pending_request: PendingRequest | None) -> int:
    """Samples of one `infer(requests, load)` call (1 for any other method)."""
    if pending_request is None or not pending_request.args:
        return 1
    first = pending_request.args[0]
    if isinstance(first, list):
        return max(1, sum(int(getattr(r, "samples", 1)) for r in first))
    return 1


def predicted_work_ms(samples_in_flight: float, stats: dict[str, Any]) -> float:
    """Work queued on a replica in ms (in samples when it has not reported its speed yet)."""
    per_sample = float(stats.get("per_sample_ms") or 0.0)
    fixed = float(stats.get("fixed_ms") or 0.0)
    if per_sample <= 0 and fixed <= 0:
        return samples_in_flight
    return samples_in_flight * per_sample + (fixed if samples_in_flight > 0 else 0.0)


class SampleBalancedRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """No FIFOMixin: each routing decision serves the very request it was made for (Serve's default
    matching by request id), so the samples counted for a replica are the samples sent to it."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._local_samples: dict[ReplicaID, int] = {}
        self._routed: dict[str, tuple[ReplicaID, int]] = {}

    def _work(self, replica: RunningReplica) -> float:
        stats = replica.routing_stats or {}
        samples = max(self._local_samples.get(replica.replica_id, 0), float(stats.get("inflight_samples", 0.0)))
        return predicted_work_ms(samples, stats)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        candidates = candidate_replicas
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            allowed = self.apply_multiplex_routing(pending_request=pending_request)
            candidates = [r for r in candidate_replicas if r.replica_id in allowed]
            if not candidates:
                return []
        shuffled = list(candidates)
        random.shuffle(shuffled)  # ties (idle replicas) spread at random
        ranked = sorted(shuffled, key=self._work)
        if pending_request is not None and ranked:
            # Serve takes the first rank unless that replica is full (max_ongoing_requests): count the batch
            # there now, so the next decision (before any stats poll) already sees it.
            self._count(pending_request.metadata.internal_request_id, ranked[0].replica_id, batch_samples(pending_request))
        # One replica per rank, least work first: Serve tries them in this order.
        return [[r] for r in ranked]

    def _count(self, request_id: str, replica_id: ReplicaID, samples: int) -> None:
        self._uncount(request_id)  # a retried decision moves the count
        self._routed[request_id] = (replica_id, samples)
        self._local_samples[replica_id] = self._local_samples.get(replica_id, 0) + samples

    def _uncount(self, request_id: str) -> None:
        routed = self._routed.pop(request_id, None)
        if routed is not None:
            rid, samples = routed
            left = self._local_samples.get(rid, 0) - samples
            if left > 0:
                self._local_samples[rid] = left
            else:
                self._local_samples.pop(rid, None)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._uncount(internal_request_id)
