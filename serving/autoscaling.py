"""Serve autoscaling policy for the policy deployments: scale on SLO pressure, not on ongoing calls.

The ingress holds the queue, so Serve's default signal (ongoing calls per replica) sees at most
`max_inflight_batches` and says nothing about deadlines. Each batch carries the ingress's demand report
(`serving.scheduler.EmbodimentScheduler.load`): samples per second arriving (served or refused: refused demand
is demand), what one replica serves per second at full batches (from the forward-time model), and from
these the replicas needed to serve the demand at 80% utilisation. Replicas keep the latest report and hand
it to Serve (`record_autoscaling_stats`); a report older than a few seconds reads as no demand, so an idle
deployment scales down. Serve applies min/max_replicas and the up/downscale delays around this function.

Configured per deployment in serve_config.yaml:
    autoscaling_config:
      min_replicas: 1
      max_replicas: 2
      upscale_delay_s: 2
      downscale_delay_s: 60
      policy:
        policy_function: serving.autoscaling:slo_autoscaling_policy
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext


def desired_replicas(replicas_needed_reports: list[float], current: int, queued_samples: float) -> int:
    """Replicas for the reported need: the largest report (every replica hears the same ingress; the largest is
    the freshest under rising load), rounded up. Requests waiting with no report yet (the model has not seen a
    reply) keep what runs."""
    if not replicas_needed_reports:
        return current
    needed = max(replicas_needed_reports)
    if needed <= 0:
        return 0 if queued_samples <= 0 else max(1, current)
    return max(1, math.ceil(needed - 1e-6))


def slo_autoscaling_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    metrics = ctx.aggregated_metrics or {}
    needed = metrics.get("replicas_needed") or {}
    if not needed:  # replicas without the stats method (an older build): Serve's own policy
        return replica_queue_length_autoscaling_policy(ctx)
    queued = max((metrics.get("queued_samples") or {0: 0.0}).values())
    return desired_replicas(list(needed.values()), ctx.current_num_replicas, queued), {}
