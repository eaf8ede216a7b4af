"""Typed configuration of a fleet application: the `args:` of `serve_config.yaml`.

Everything has a default that works on one machine, so `args: {}` serves the two demo embodiments.
Validation errors name the field and say what was expected; Serve shows them in `serve status`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_CHECKPOINT_ROOT = "checkpoints"

# Ray and Serve settings for the replicas of a fleet app: the `runtime_env.env_vars` of the application in
# serve_config.yaml (and cluster/serve_config.gpu.yaml). They are read when a worker process starts, so code
# cannot set them; the ingress logs a warning when they are missing. Measured on the 2-core CI machine
# (BENCHMARKS.md): a Serve handle call 3.4 -> 2.9 ms, with a 150 KB observation 7.1 -> 3.0 ms.
LOW_LATENCY_ENV_VARS: dict[str, str] = {
    # User code on the replica's own event loop: no hop to a second loop thread and back on every call. Safe
    # here: the ingress never blocks its loop, and the policy's forward pass runs in a worker thread.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # The ingress's handles route on the ingress's loop, not on a loop thread of their own.
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # One robot's observation (a 224x224 camera frame is 150 KB) travels inside the call instead of through
    # the object store (Ray's default limit is 100 KB); larger batches still go through the object store.
    "RAY_max_direct_call_object_size": str(2**20),
}


def canonical_tag(tag: str) -> str:
    """Embodiment tags are case-insensitive (`GR1`, `EmbodimentTag.GR1` and `gr1` are one tag)."""
    tag = tag.strip()
    if tag.lower().startswith("embodimenttag."):
        tag = tag.split(".", 1)[1]
    return tag.lower()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PortConfig(_Strict):
    """One ZMQ ROUTER socket. Robots on it are served `embodiment` unless a request names another."""

    port: int = Field(ge=1, le=65535)
    embodiment: str
    api_token: str | None = Field(default=None, description="Overrides ingress.api_token on this port.")
    slo_ms: float | None = Field(
        default=None, gt=0,
        description="Deadline of a get_action on this port without options.deadline_ms (overrides the embodiment's slo_ms).",
    )

    @field_validator("embodiment")
    @classmethod
    def _canonical(cls, v: str) -> str:
        return canonical_tag(v)


class CurveConfig(_Strict):
    """CurveZMQ encryption and client authentication (keys as z85 text, see `python -m clients.keys`)."""

    server_public_key: str
    server_secret_key: str
    allowed_client_keys: list[str] | None = Field(
        default=None, description="Client public keys allowed to connect; None allows any client that knows the server key."
    )


class IngressConfig(_Strict):
    host: str = "127.0.0.1"
    ports: list[PortConfig] = Field(
        default_factory=lambda: [PortConfig(port=5555, embodiment="gr1"), PortConfig(port=5556, embodiment="unitree_g1")]
    )
    api_token: str | None = None
    curve: CurveConfig | None = None
    max_message_bytes: int = Field(default=64 * 2**20, ge=1024, description="zmq.MAXMSGSIZE: larger messages are dropped by ZMQ.")
    max_batch_per_request: int = Field(default=64, ge=1, description="Largest B one request may carry.")
    max_inflight_batches: int = Field(
        default=4, ge=1, description="Batches of one embodiment on their way to replicas at once; past it requests wait and batch up."
    )
    request_timeout_ms: float = Field(
        default=12_000, gt=0,
        description="Answer 'deadline exceeded' after this long (below PolicyClient's 15 s default, so robots hear why).",
    )
    max_queued_requests: int = Field(
        default=512, ge=1, description="get_action requests waiting per embodiment; past it new ones get 'overloaded' at once."
    )
    scheduler: Literal["edf", "fifo"] = Field(
        default="edf",
        description=(
            "edf: earliest deadline first, batches sized to meet their earliest deadline, requests predicted to "
            "miss theirs refused at once; fifo: the previous oldest-first micro-batching (for comparison)."
        ),
    )

    @model_validator(mode="after")
    def _unique_ports(self) -> "IngressConfig":
        seen: dict[int, str] = {}
        for p in self.ports:
            if p.port in seen:
                raise ValueError(
                    f"ingress.ports: port {p.port} is listed twice (for {seen[p.port]!r} and {p.embodiment!r}); "
                    "each port serves one default embodiment"
                )
            seen[p.port] = p.embodiment
        if not self.ports:
            raise ValueError("ingress.ports: expected at least one port, got none")
        return self


class BatchingConfig(_Strict):
    """A policy deployment's `user_config`: changes apply live, without restarting replicas."""

    max_batch_size: int = Field(default=16, ge=1, description="Most samples in one forward pass.")
    batch_wait_ms: float = Field(default=2.0, ge=0, description="How long the ingress waits to fill a batch.")


class PolicyConfig(_Strict):
    """How a policy replica loads its embodiment: the replica's init args (a change restarts replicas)."""

    checkpoint: str | None = Field(
        default=None, description="Checkpoint directory; default <checkpoint_root>/<demo_preset>-<tag> when demo_preset is set."
    )
    demo_preset: Literal["tiny", "small", "n16-3b"] | None = Field(
        default=None, description="Build a demo checkpoint of this preset offline where `checkpoint` is missing."
    )
    backend: Literal["native", "gr00t"] = "native"
    device: str = Field(default="auto", description="auto (CUDA where present), cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    strict: bool = True
    torch_threads: int | None = Field(default=None, ge=1, description="torch.set_num_threads in each replica (CPU).")

    @model_validator(mode="after")
    def _has_source(self) -> "PolicyConfig":
        if self.checkpoint is None and self.demo_preset is None:
            raise ValueError("checkpoint: expected a checkpoint directory (or demo_preset to build one), got neither")
        return self


class AdmissionConfig(_Strict):
    """How the ingress admits one embodiment's requests (the per-embodiment overrides already applied)."""

    request_timeout_ms: float = Field(gt=0)
    max_queued_requests: int = Field(ge=1)
    slo_ms: float | None = Field(default=None, gt=0)

    def deadline_ms(self, asked_ms: float | None, port_slo_ms: float | None) -> float:
        """A get_action's time budget: options.deadline_ms, else the port's slo_ms, else the embodiment's,
        else request_timeout_ms; never more than request_timeout_ms."""
        for budget in (asked_ms, port_slo_ms, self.slo_ms):
            if budget is not None:
                return min(float(budget), self.request_timeout_ms)
        return self.request_timeout_ms


class EmbodimentConfig(PolicyConfig):
    """One embodiment: its checkpoint, how its replicas run, its admission limits and starting batching."""

    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    request_timeout_ms: float | None = Field(default=None, gt=0, description="Overrides ingress.request_timeout_ms.")
    max_queued_requests: int | None = Field(default=None, ge=1, description="Overrides ingress.max_queued_requests.")
    slo_ms: float | None = Field(
        default=None, gt=0,
        description=(
            "Deadline of this embodiment's get_action requests that carry no options.deadline_ms (a port's "
            "slo_ms overrides it); default request_timeout_ms. Set it to the time a robot's action chunk lasts."
        ),
    )

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(**self.model_dump(exclude={"batching", "request_timeout_ms", "max_queued_requests", "slo_ms"}))

    def admission(self, ingress: IngressConfig) -> AdmissionConfig:
        return AdmissionConfig(
            request_timeout_ms=self.request_timeout_ms or ingress.request_timeout_ms,
            max_queued_requests=self.max_queued_requests or ingress.max_queued_requests,
            slo_ms=self.slo_ms,
        )


def _default_embodiments() -> dict[str, EmbodimentConfig]:
    return {
        "gr1": EmbodimentConfig(demo_preset="small"),
        "unitree_g1": EmbodimentConfig(demo_preset="small"),
    }


class FleetArgs(_Strict):
    """`args:` of the fleet application (`import_path: serving.app:build_app`)."""

    ingress: IngressConfig = Field(default_factory=IngressConfig)
    embodiments: dict[str, EmbodimentConfig] = Field(default_factory=_default_embodiments)
    checkpoint_root: str = Field(
        default=DEFAULT_CHECKPOINT_ROOT, description="Where relative checkpoint paths live (relative to the working directory)."
    )

    @field_validator("embodiments")
    @classmethod
    def _canonical_tags(cls, v: dict[str, EmbodimentConfig]) -> dict[str, EmbodimentConfig]:
        out: dict[str, EmbodimentConfig] = {}
        for tag, cfg in v.items():
            key = canonical_tag(tag)
            if key in out:
                raise ValueError(f"embodiments: {tag!r} and another entry are the same tag {key!r} (tags are case-insensitive)")
            out[key] = cfg
        if not out:
            raise ValueError("embodiments: expected at least one embodiment, got none")
        return out

    @model_validator(mode="after")
    def _ports_name_served_embodiments(self) -> "FleetArgs":
        for p in self.ingress.ports:
            if p.embodiment not in self.embodiments:
                raise ValueError(
                    f"ingress.ports: port {p.port} defaults to embodiment {p.embodiment!r}, "
                    f"which is not configured; configured: {sorted(self.embodiments)}"
                )
        return self

    def checkpoint_path(self, tag: str) -> Path:
        """Absolute checkpoint directory of `tag`, resolved once where the app is built."""
        cfg = self.embodiments[tag]
        if cfg.checkpoint is not None:
            path = Path(os.path.expanduser(cfg.checkpoint))
        else:
            path = Path(os.path.expanduser(self.checkpoint_root)) / f"{cfg.demo_preset}-{tag}"
        return path.resolve()  # relative paths: against the working directory of `serve run`
