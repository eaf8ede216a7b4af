"""Typed configuration of a fleet application: the `args:` of `serve_config.yaml`.

Everything has a default that works on one machine, so `args: {}` serves the two demo embodiments.
Validation errors name the field and say what was expected; Serve shows them in `serve status`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clients.protocol import PortProtocol, canonical_tag

DEFAULT_CHECKPOINT_ROOT = "checkpoints"

# Ray and Serve settings for the replicas of a fleet app: the `runtime_env.env_vars` of the application in
# serve_config.yaml (and cluster/serve_config.gpu.yaml). They are read when a worker process starts, so code
# cannot set them; the ingress logs a warning when they are missing. Measured on the 2-core CI machine
# (BENCHMARKS.md): a Serve handle call 3.4 -> 2.9 ms, with a 150 KB observation 7.1 -> 3.0 ms.
GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
LOW_LATENCY_ENV_VARS: dict[str, str] = {
    # User code on the replica's own event loop: no hop to a second loop thread and back on every call. Safe
    # here: the ingress never blocks its loop, and the policy's forward pass runs in a worker thread.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # The ingress's handles route on the ingress's loop, not on a loop thread of their own.
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # One robot's observation (a 224x224 camera frame is 150 KB) travels inside the call instead of through
    # the object store (Ray's default limit is 100 KB); larger batches still go through the object store.
    "RAY_max_direct_call_object_size": str(2**20),
    # The batches travel by Serve's gRPC transport (serving/models.py, ModelRegistry.batch_handle: ~1.2 ms less
    # per call than an actor call), whose replicas and callers take messages up to 4 MiB by default: 16
    # robots' 224x224 frames are 2.4 MB, a batch of 64 or several cameras more. 1 GiB; gRPC's own ceiling is 2.
    GRPC_MAX_MESSAGE_ENV: str(2**30),
    # OpenMP's threads spin this many rounds at a barrier before they sleep (libgomp's default, 300000, is
    # milliseconds): within a pass the next parallel op comes sooner, so passes keep their speed (small, B=1 at
    # two threads: 144 ms either way), but between passes a spinning thread no longer takes the second core from
    # the ingress and Ray (tiny at two threads: 11 instead of 21 ms of CPU per 6 ms pass).
    "GOMP_SPINCOUNT": "10000",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PortConfig(_Strict):
    """One ZMQ ROUTER socket. Robots on it are served `embodiment` unless a request names another."""

    port: int = Field(ge=1, le=65535)
    embodiment: str
    api_token: str | None = Field(default=None, description="Overrides ingress.api_token on this port.")
    protocol: Literal["auto", "n1.5"] = Field(
        default="auto",
        description="auto: N1.6, N1.7 and msgpack-numpy clients, each answered in its own array encoding; "
        "n1.5: N1.5 clients, answered exactly as upstream's N1.5 server answered them.",
    )

    model: str | None = Field(
        default=None, description="Model robots on this port get unless a request names one; default: the embodiment's default."
    )
    slo_ms: float | None = Field(
        default=None, gt=0,
        description="Deadline of a get_action on this port without options.deadline_ms (overrides the embodiment's slo_ms).",
    )

    @property
    def port_protocol(self) -> PortProtocol:
        return PortProtocol(self.protocol)

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
    robot_sessions: int = Field(
        default=4096, ge=0,
        description="Robots whose last chunk the ingress keeps for real-time chunking (options.robot_id); 0: none.",
    )
    robot_session_ttl_s: float = Field(default=60.0, gt=0, description="A robot silent this long starts fresh.")
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
            "edf: the tighter deadline class first, then the earliest deadline; batches sized to meet their earliest "
            "deadline (and kept short enough for a tighter class); requests predicted to miss theirs refused at "
            "once; fifo: the previous oldest-first micro-batching (for comparison)."
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


# policy.make_demo_checkpoint.PRESETS (checked by a test; this module imports neither torch nor policy).
DemoPreset = Literal["tiny", "small", "n16-3b", "n17-small", "n17-3b", "tiny-smooth", "small-smooth"]


class PolicyConfig(_Strict):
    """How a policy replica loads its embodiment: the replica's init args (a change restarts replicas)."""

    checkpoint: str | None = Field(
        default=None, description="Checkpoint directory; default <checkpoint_root>/<demo_preset>-<tag> when demo_preset is set."
    )
    demo_preset: DemoPreset | None = Field(
        default=None, description="Build a demo checkpoint of this preset offline where `checkpoint` is missing."
    )
    backend: Literal["native", "gr00t", "auto"] = Field(
        default="native",
        description="native: our own model code (GR00T N1.6 and N1.7 checkpoints as NVIDIA writes them); gr00t: NVIDIA's "
        "Isaac-GR00T package, where installed; auto: native where it implements the checkpoint's model_type.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="The backbone's tokenizer folder (NVIDIA's checkpoints carry none: for N1.6 the "
        "Eagle-Block2A-2B-v2 folder inside Isaac-GR00T, for N1.7 the Cosmos-Reason2 / Qwen3-VL processor folder); "
        "default: the folder config.json's model_name names.",
    )
    backbone_config: str | None = Field(
        default=None,
        description="The backbone's config.json (checkpoints do not store the backbone's sizes): Eagle-style for "
        "N1.6, Qwen3-VL for N1.7; default: the model_name folder's, else the released backbone's sizes.",
    )
    device: str = Field(default="auto", description="auto (CUDA where present), cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    strict: bool = True
    torch_threads: int | None = Field(default=None, ge=1, description="torch.set_num_threads in each replica (CPU).")
    compile: Literal["none", "torch_compile", "cuda_graphs"] = Field(
        default="none",
        description="Native backend: run over fixed batch buckets with torch.compile, or with it as CUDA graphs (GPU).",
    )

    @model_validator(mode="after")
    def _has_source(self) -> "PolicyConfig":
        if self.checkpoint is None and self.demo_preset is None:
            raise ValueError("checkpoint: expected a checkpoint directory (or demo_preset to build one), got neither")
        return self


DEFAULT_MODEL = "default"  # the model an embodiment's own checkpoint / demo_preset serves
# What a model name may look like: it becomes a Serve multiplexed model id, a metric tag and a directory name.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelSource(_Strict):
    """One fine-tune of an embodiment: a checkpoint directory, or a demo checkpoint built offline from a seed."""

    checkpoint: str | None = Field(default=None, description="Checkpoint directory (relative: against the working directory of `serve run`).")
    demo_preset: DemoPreset | None = Field(
        default=None, description="Build a demo checkpoint of this preset (at <checkpoint_root>/<preset>-<tag>-seed<N>) where `checkpoint` is missing."
    )
    demo_seed: int = Field(default=0, ge=0, description="Seed of the demo weights: one seed, one distinct fine-tune.")

    @model_validator(mode="after")
    def _has_source(self) -> "ModelSource":
        if self.checkpoint is None and self.demo_preset is None:
            raise ValueError("expected `checkpoint` (a directory) or `demo_preset` (with demo_seed), got neither")
        return self


def check_model_names(models: dict[str, Any], where: str) -> None:
    for name in models:
        if name == DEFAULT_MODEL:
            raise ValueError(
                f"{where}: {DEFAULT_MODEL!r} is the embodiment's own checkpoint/demo_preset; name the fine-tune otherwise"
            )
        if not MODEL_NAME.match(name):
            raise ValueError(
                f"{where}: model name {name!r:.80} is not allowed; expected 1-64 letters, digits, '.', '_' or '-' "
                "starting with a letter or digit"
            )


class PolicyUserConfig(BatchingConfig):
    """The full `user_config` of a policy deployment: batching, and optionally the live set of fine-tunes.

    `models` here replaces `args.embodiments.<tag>.models` while it is set: editing it in the serve config and
    running `serve deploy` reconfigures the replicas (models load on demand) instead of restarting them, which
    any change under `args:` does (Serve rebuilds the whole application when its args change).
    """

    models: dict[str, ModelSource] | None = Field(
        default=None, description="Fine-tunes served beside the default model; None: those of args.embodiments.<tag>.models."
    )

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, ModelSource] | None) -> dict[str, ModelSource] | None:
        if v is not None:
            check_model_names(v, "user_config.models")
        return v

    def batching(self) -> BatchingConfig:
        return BatchingConfig(**self.model_dump(exclude={"models"}))


class AdmissionConfig(_Strict):
    """How the ingress admits one embodiment's requests (the per-embodiment overrides already applied)."""

    request_timeout_ms: float = Field(gt=0)
    max_queued_requests: int = Field(ge=1)
    slo_ms: float | None = Field(default=None, gt=0)
    control_hz: float | None = Field(default=None, gt=0)

    def deadline_ms(self, asked_ms: float | None, port_slo_ms: float | None) -> float:
        """A get_action's time budget: options.deadline_ms (or the time the robot's buffered steps last), else
        the port's slo_ms, else the embodiment's, else request_timeout_ms; never more than request_timeout_ms."""
        for budget in (asked_ms, port_slo_ms, self.slo_ms):
            if budget is not None:
                return min(float(budget), self.request_timeout_ms)
        return self.request_timeout_ms


class EmbodimentConfig(PolicyConfig):
    """One embodiment: its checkpoint, how its replicas run, its admission limits and starting batching."""

    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    request_timeout_ms: float | None = Field(default=None, gt=0, description="Overrides ingress.request_timeout_ms.")
    max_queued_requests: int | None = Field(default=None, ge=1, description="Overrides ingress.max_queued_requests.")
    models: dict[str, ModelSource] = Field(
        default_factory=dict,
        description="Fine-tunes of this embodiment served by the same replicas, loaded on demand (name -> source).",
    )
    max_models_per_replica: int = Field(
        default=4, ge=1, description="Fine-tunes one replica keeps loaded besides the default; past it the least recently used is evicted.",
    )

    slo_ms: float | None = Field(
        default=None, gt=0,
        description=(
            "Deadline of this embodiment's get_action requests that carry no options.deadline_ms (a port's "
            "slo_ms overrides it); default request_timeout_ms. Set it to the time a robot's action chunk lasts."
        ),
    )
    control_hz: float | None = Field(
        default=None, gt=0,
        description=(
            "The robots' control rate (a request's options.control_hz overrides it): turns options.buffer_steps "
            "into a deadline (when the buffer runs dry) and lets robot sessions (options.robot_id) work out "
            "which steps of the last chunk a robot has executed."
        ),
    )

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, ModelSource]) -> dict[str, ModelSource]:
        check_model_names(v, "models")
        return v

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(**self.model_dump(
            exclude={"batching", "request_timeout_ms", "max_queued_requests", "models", "max_models_per_replica",
                     "slo_ms", "control_hz"}
        ))

    def admission(self, ingress: IngressConfig) -> AdmissionConfig:
        return AdmissionConfig(
            request_timeout_ms=self.request_timeout_ms or ingress.request_timeout_ms,
            max_queued_requests=self.max_queued_requests or ingress.max_queued_requests,
            slo_ms=self.slo_ms,
            control_hz=self.control_hz,
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
            served = [DEFAULT_MODEL, *self.embodiments[p.embodiment].models]
            if p.model is not None and p.model not in served:
                raise ValueError(
                    f"ingress.ports: port {p.port} defaults to model {p.model!r}, which embodiment {p.embodiment!r} "
                    f"does not serve; its models: {', '.join(served)}"
                )
        return self

    @model_validator(mode="after")
    def _models_match_their_embodiment(self) -> "FleetArgs":
        for tag in self.embodiments:
            sources = self.model_sources(tag)
            reference = sources.pop(DEFAULT_MODEL)
            for name, source in sources.items():
                mismatch = layout_mismatch(tag, reference, source)
                if mismatch:
                    raise ValueError(f"embodiments.{tag}.models.{name}: {mismatch}")
        return self

    def checkpoint_path(self, tag: str) -> Path:
        """Absolute checkpoint directory of `tag`, resolved once where the app is built."""
        cfg = self.embodiments[tag]
        if cfg.checkpoint is not None:
            path = Path(os.path.expanduser(cfg.checkpoint))
        else:
            path = Path(os.path.expanduser(self.checkpoint_root)) / f"{cfg.demo_preset}-{tag}"
        return path.resolve()  # relative paths: against the working directory of `serve run`

    def model_sources(self, tag: str) -> dict[str, "ModelSource"]:
        """Every model of `tag`, its default first, with absolute checkpoint paths."""
        cfg = self.embodiments[tag]
        out = {DEFAULT_MODEL: ModelSource(checkpoint=str(self.checkpoint_path(tag)), demo_preset=cfg.demo_preset)}
        for name, src in cfg.models.items():
            out[name] = resolve_model_source(src, tag, self.checkpoint_root)
        return out


def missing_demo_checkpoint(tag: str, source: ModelSource) -> str | None:
    """Why a replica cannot load `source`, when it is a demo checkpoint nobody has built yet; else None.
    Replicas only load: the app builder builds demo checkpoints (serving.demo_checkpoints)."""
    if source.demo_preset is None or (Path(source.checkpoint or "") / "config.json").is_file():
        return None
    return (
        f"demo checkpoint for {tag!r} ({source.demo_preset}, seed {source.demo_seed}) is not built at {source.checkpoint}: "
        "the app builder builds the ones under `args:` before the replicas start; build the ones added live in "
        "user_config with `python -m serving.demo_checkpoints <serve config>` before `serve deploy` (on every node "
        "of a cluster, or under a checkpoint_root every node shares)"
    )


def resolve_model_source(src: ModelSource, tag: str, checkpoint_root: str) -> ModelSource:
    """`src` with an absolute checkpoint directory (a demo fine-tune's: <checkpoint_root>/<preset>-<tag>-seed<N>)."""
    if src.checkpoint is not None:
        path = Path(os.path.expanduser(src.checkpoint))
    else:
        path = Path(os.path.expanduser(checkpoint_root)) / f"{src.demo_preset}-{tag}-seed{src.demo_seed}"
    return src.model_copy(update={"checkpoint": str(path.resolve())})


@dataclass
class _Layout:
    """What a model's checkpoint says about one tag, read from JSON only (no torch in the config check)."""

    where: str  # the file (or demo layout) it comes from
    held_tags: list[str]  # the tags the checkpoint holds
    modality_configs: dict[str, Any] | None  # JSON form; None when the checkpoint does not hold the tag


def _read_layout(tag: str, source: ModelSource) -> _Layout | None:
    """None for a checkpoint not built yet with no demo preset: the replica's loader reports it, naming the path."""
    from policy.checkpoint import PROCESSOR_CONFIG_FILE, modality_layout

    path = Path(source.checkpoint or "")
    if (path / PROCESSOR_CONFIG_FILE).is_file():
        held, layout = modality_layout(path, tag)  # a broken file raises, naming it
        return _Layout(str(path / PROCESSOR_CONFIG_FILE), held, layout)
    if source.demo_preset is not None:  # a demo checkpoint built later: every seed has its tag's demo layout
        from policy.make_demo_checkpoint import embodiment_layout

        layout = {m: mc.to_json() for m, mc in embodiment_layout(tag)["modality_configs"].items()}
        return _Layout(f"the {source.demo_preset!r} demo layout of {tag!r}", [tag], layout)
    return None


def layout_mismatch(tag: str, reference: ModelSource, source: ModelSource) -> str | None:
    """Why `source` cannot serve `tag` beside `reference` (another tag, another modality layout), or None."""
    mine = _read_layout(tag, source)
    if mine is None:
        return None
    if mine.modality_configs is None:
        return f"checkpoint {mine.where} does not hold embodiment {tag!r}; it holds: {', '.join(mine.held_tags) or '(none)'}"
    ref = _read_layout(tag, reference)
    if ref is None or ref.modality_configs is None:
        return None  # the default model's own load reports that
    for modality in sorted(set(mine.modality_configs) | set(ref.modality_configs)):
        if mine.modality_configs.get(modality) != ref.modality_configs.get(modality):
            return (
                f"its {modality!r} modality layout differs from the embodiment's default model: "
                f"{mine.modality_configs.get(modality)} (from {mine.where}) vs {ref.modality_configs.get(modality)} "
                f"(from {ref.where}); every model of an embodiment must take the same observations and return the "
                "same actions"
            )
    return None
