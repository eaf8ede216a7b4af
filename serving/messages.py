"""What travels between the ingress and the policy replicas: one Ray call carries a list of these.

Plain dataclasses of numpy arrays and builtins, so Ray serialises them with pickle protocol 5 and the
arrays travel out-of-band (zero-copy reads from the object store on the replica's side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class InferenceRequest:
    observation: dict[str, Any]  # nested form: {"video": {...}, "state": {...}, "language": {...}}
    options: dict[str, Any] | None
    samples: int  # B, as counted by the ingress; the policy checks it for real
    deadline: float | None = None  # epoch seconds; past it the replica skips the request instead of computing it


@dataclass
class InferenceOutcome:
    action: dict[str, Any] | None
    info: dict[str, Any]
    error: str | None = None
    error_kind: str | None = None  # "bad_request" (the robot's fault) or "policy" (ours); metrics count by it


@dataclass
class BatchReply:
    outcomes: list[InferenceOutcome]
    replica: str
    # The replica's live batching settings (its user_config), so the ingress follows changes without a restart.
    max_batch_size: int
    batch_wait_ms: float
    timings: list[dict[str, float]] = field(default_factory=list)  # per outcome: forward_start (epoch s), infer_ms, batch_size
    # Models loaded on this replica now, least recently used first: the ingress's `info` says where each one is.
    models_resident: list[str] = field(default_factory=list)
    cold_load_ms: float = 0.0  # > 0: this call waited for its model to load on the replica (that long)
    # When this call entered the replica, its @serve.batch handler started, and it returned (epoch s): the
    # replica's hops of a request's trace (bench.hops).
    trace: dict[str, float] = field(default_factory=dict)
