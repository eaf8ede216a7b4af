"""What travels between the ingress and the policy replicas: one Ray call carries a list of these.

Plain dataclasses of numpy arrays and builtins, so Ray serialises them with pickle protocol 5 and the
arrays travel out-of-band: the observation's frames are copied once, into the call (or the object store),
and the replica reads them in place.
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
    reason: str | None = None  # a clients.protocol.Refusal value: "expired_on_replica" when the replica skipped it


@dataclass
class ForwardPass:
    """One forward pass of a reply: when it started (epoch s), how long it ran, how many samples it computed
    (0 when every request in it had expired: it says nothing about forward time), on how many torch threads."""

    start: float
    infer_ms: float
    samples: int
    threads: int = 1


@dataclass
class BatchReply:
    outcomes: list[InferenceOutcome]
    replica: str
    # The replica's live batching settings (its user_config), so the ingress follows changes without a restart.
    max_batch_size: int
    batch_wait_ms: float
    passes: list[ForwardPass] = field(default_factory=list)
    pass_of: list[int] = field(default_factory=list)  # per outcome: its pass in `passes` (-1: it had none)
    # Models loaded on this replica now, least recently used first: the ingress's `info` says where each one is.
    models_resident: list[str] = field(default_factory=list)
    cold_load_ms: float = 0.0  # > 0: this call waited for its model to load on the replica (that long)
    # When the call entered the replica, its pass queue took it, and it returned (epoch s): the replica's hops
    # of a traced request (bench.hops).
    trace: dict[str, float] = field(default_factory=dict)
