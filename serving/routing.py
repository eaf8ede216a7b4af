"""Serve request router for the policy deployments: balance samples, not calls.

Serve's default router balances calls, so closed-loop robots answered together come back together and two
replicas run lopsided batches (one of 14, one of 2). Here each batch goes to the replica predicted to be
free first: for the batches this router sent it, each one's pass (fixed cost + samples x time per sample,
as the replica reports its speed) queued behind the previous from when it was sent. Counting samples
alone is not enough: a replica that is just finishing a batch (its reply on the way, not yet counted
back) would look busier than one that started a smaller batch a moment ago, and the next batch would
wait behind that one. Another caller's calls on a replica this router has nothing on are taken from the
replica's own report (`record_routing_stats`, a poll behind). Multiplexed model ids are honoured first
(Serve's MultiplexMixin: replicas holding the model, then those holding the fewest), so per-model
handles keep their affinity.

Configured per deployment in serve_config.yaml:
    request_router_config:
      request_router_class: serving.routing:SampleBalancedRouter
      request_routing_stats_period_s: 0.5
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


STATS_STALE_S = 1.0  # twice request_routing_stats_period_s: a replica's report may lag a completion this long


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
    matching by request id), so the batches counted for a replica are the batches sent to it."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._routed: dict[str, tuple[ReplicaID, int, float]] = {}  # request id -> (replica, samples, sent at)
        self._completed_at: dict[ReplicaID, float] = {}

    def _rank_key(self, replica: RunningReplica) -> tuple[float, float]:
        """(ms until the replica is predicted free, samples in flight there): least first."""
        stats = replica.routing_stats or {}
        mine = sorted((at, n) for rid, n, at in self._routed.values() if rid == replica.replica_id)
        samples = float(sum(n for _, n in mine))
        now = time.monotonic()
        if not mine:
            # Nothing of ours there: the replica's report counts other callers' work, unless it may still
            # count ours (a batch of ours completed since the last poll).
            if now - self._completed_at.get(replica.replica_id, -STATS_STALE_S) < STATS_STALE_S:
                return 0.0, 0.0
            others = float(stats.get("inflight_samples", 0.0))
            return predicted_work_ms(others, stats), others
        per_sample = float(stats.get("per_sample_ms") or 0.0)
        fixed = float(stats.get("fixed_ms") or 0.0)
        if per_sample <= 0 and fixed <= 0:  # speed not reported yet: samples
            return samples, samples
        free = -math.inf
        for at, n in mine:  # passes in the order sent, each after the previous
            free = max(free, at) + (fixed + per_sample * n) / 1000.0
        return max(0.0, free - now) * 1000.0, samples

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
        ranked = sorted(shuffled, key=self._rank_key)
        if pending_request is not None and ranked:
            # Serve takes the first rank unless that replica is full (max_ongoing_requests): count the batch
            # there now, so the next decision (before any stats poll) already sees it.
            self._routed[pending_request.metadata.internal_request_id] = (
                ranked[0].replica_id, batch_samples(pending_request), time.monotonic())
        # One replica per rank, least work first: Serve tries them in this order.
        return [[r] for r in ranked]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._routed.pop(internal_request_id, None)
        self._completed_at[replica_id] = time.monotonic()
