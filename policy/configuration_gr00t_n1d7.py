"""Configuration of GR00T N1.7 as NVIDIA's checkpoints store it (``model_type: "Gr00tN1d7"``).

NVIDIA's ``save_pretrained`` writes every field of its ``Gr00tN1d7Config`` to config.json; the defaults below are
used only for keys a config.json leaves out. They are the released GR00T-N1.7-3B's sizes (the defaults of NVIDIA's
config class have changed between its releases; the checkpoint's own values always win): a Cosmos-Reason2-2B
(Qwen3-VL) backbone cut at 16 decoder layers, a 4-block vision-language self-attention (32 heads x 64), a 32-block
alternate-VL DiT (32 heads x 48), horizon 40, state and action padded to 132, 4 Euler steps.

The backbone's own dimensions are not here: they come from the Qwen3-VL config.json in the folder ``model_name``
names (or ``backbone_config``), default Cosmos-Reason2-2B's (policy.modeling_gr00t_n1d7).

Plain dataclasses, no torch, nothing that changes with the transformers version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .configuration_gr00t_n1d6 import (
    HEAD_SIZES,
    N1D6_DIFFUSION_MODEL_CFG,
    ConfigError,
    DiTConfig,
    _fields_from,
    check_head_fields,
)

MODEL_TYPE = "Gr00tN1d7"
DEFAULT_BACKBONE = "nvidia/Cosmos-Reason2-2B"

# N1.7's DiT has N1.6's shape (32 alternate-VL blocks of 32 heads x 48, output 1024).
N1D7_DIFFUSION_MODEL_CFG: dict[str, Any] = dict(N1D6_DIFFUSION_MODEL_CFG)

N1D7_VL_SELF_ATTENTION_CFG: dict[str, Any] = {
    "positional_embeddings": None,
    "num_layers": 4,
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "dropout": 0.2,
    "final_dropout": True,
}


@dataclass(frozen=True)
class VLSelfAttentionConfig:
    """``vl_self_attention_cfg`` of an N1.7 config.json (the fields inference reads).

    ``from_json(None)`` (the key set to null, or a config with 0 layers) is no self-attention at all, as NVIDIA's
    head builds it then (an identity)."""

    num_layers: int = 4
    num_attention_heads: int = 32
    attention_head_dim: int = 64

    @classmethod
    def from_json(
        cls, cfg: Mapping[str, Any] | None, where: str = "config.json vl_self_attention_cfg"
    ) -> "VLSelfAttentionConfig":
        if cfg is None:
            return cls(num_layers=0)
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{where}: expected an object or null, got {type(cfg).__name__}")
        if cfg.get("positional_embeddings") is not None:
            # N1.7 checkpoints set None; a sinusoidal table here would change every number.
            raise ConfigError(f"{where}.positional_embeddings: expected null, got {cfg['positional_embeddings']!r}")
        out = cls(
            num_layers=int(cfg.get("num_layers", 0)),
            num_attention_heads=int(cfg.get("num_attention_heads", cls.num_attention_heads)),
            attention_head_dim=int(cfg.get("attention_head_dim", cls.attention_head_dim)),
        )
        if out.num_layers < 0 or out.num_attention_heads < 1 or out.attention_head_dim < 1:
            raise ConfigError(f"{where}: expected num_layers >= 0 and positive heads / head dim, got {dict(cfg)}")
        return out

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_json(self) -> dict[str, Any]:
        return {**N1D7_VL_SELF_ATTENTION_CFG, "num_layers": self.num_layers,
                "num_attention_heads": self.num_attention_heads, "attention_head_dim": self.attention_head_dim}


@dataclass(frozen=True)
class Gr00tN1d7Config:
    """The inference-relevant fields of NVIDIA's ``Gr00tN1d7Config`` (GR00T-N1.7-3B's values as defaults).

    Read by the shared action head (policy.flow_matching.HeadConfig) and by the N1.7 processor; training-only
    fields (dropouts, tune_*, noise_beta_*) are ignored. ``use_percentiles``, ``use_relative_action``,
    ``apply_sincos_state_encoding``, ``exclude_state`` and ``use_mean_std`` are recorded for reference: NVIDIA's
    processor (and ours) reads them from processor_config.json."""

    model_name: str = DEFAULT_BACKBONE
    backbone_model_type: str = "qwen"
    select_layer: int = 16  # decoder layers of the Qwen3-VL text model kept (features before the final norm)
    backbone_embedding_dim: int = 2048
    max_state_dim: int = 132
    max_action_dim: int = 132
    action_horizon: int = 40
    hidden_size: int = 1024
    input_embedding_dim: int = 1536
    state_history_length: int = 1  # state steps the state encoder reads at once (flattened)
    add_pos_embed: bool = True
    use_vlln: bool = True
    max_seq_len: int = 1024
    use_alternate_vl_dit: bool = True
    attend_text_every_n_blocks: int = 2
    num_inference_timesteps: int = 4
    num_timestep_buckets: int = 1000
    max_num_embodiments: int = 32
    rtc_ramp_rate: float = 6.0  # real-time chunking (inpainting) ramp; RTC itself is not served yet
    use_percentiles: bool = True
    use_relative_action: bool = False
    apply_sincos_state_encoding: bool = False
    exclude_state: bool = False
    use_mean_std: bool = False
    dit: DiTConfig = field(default_factory=lambda: DiTConfig.from_dict(N1D7_DIFFUSION_MODEL_CFG, "diffusion_model_cfg"))
    vl_self_attention: VLSelfAttentionConfig = field(default_factory=VLSelfAttentionConfig)

    @property
    def state_input_dim(self) -> int:
        """Width of the state encoder's input: the state history flattened into one token."""
        return self.max_state_dim * self.state_history_length

    @classmethod
    def from_checkpoint_dict(cls, data: Mapping[str, Any], where: str = "config.json") -> "Gr00tN1d7Config":
        if data.get("model_type") not in (None, MODEL_TYPE):
            raise ConfigError(f"{where}: model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
        kw = _fields_from(cls, data, where, ignore=("dit", "vl_self_attention"))
        kw["dit"] = DiTConfig.from_dict(data.get("diffusion_model_cfg", N1D7_DIFFUSION_MODEL_CFG),
                                        f"{where} diffusion_model_cfg")
        kw["vl_self_attention"] = VLSelfAttentionConfig.from_json(
            data.get("vl_self_attention_cfg", N1D7_VL_SELF_ATTENTION_CFG), f"{where} vl_self_attention_cfg")
        cfg = cls(**kw)
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        check_head_fields(self, where, (*HEAD_SIZES, "state_history_length", "num_timestep_buckets"))
        if self.backbone_model_type != "qwen":
            raise ConfigError(f"{where}.backbone_model_type: expected 'qwen' (Qwen3-VL), got {self.backbone_model_type!r}")
        vsa = self.vl_self_attention
        if vsa.num_layers and vsa.inner_dim != self.backbone_embedding_dim:
            raise ConfigError(
                f"{where} vl_self_attention_cfg: num_attention_heads x attention_head_dim ({vsa.inner_dim}) must "
                f"equal backbone_embedding_dim {self.backbone_embedding_dim}"
            )

    def to_checkpoint_dict(self) -> dict[str, Any]:
        """A config.json body NVIDIA's loader and :meth:`from_checkpoint_dict` both read (every field written)."""
        out: dict[str, Any] = {"architectures": [MODEL_TYPE], "model_type": MODEL_TYPE}
        for name in self.__dataclass_fields__:
            if name not in ("dit", "vl_self_attention"):
                out[name] = getattr(self, name)
        d = self.dit
        out["diffusion_model_cfg"] = {
            **N1D7_DIFFUSION_MODEL_CFG, "num_layers": d.num_layers, "num_attention_heads": d.num_attention_heads,
            "attention_head_dim": d.attention_head_dim, "output_dim": d.output_dim,
            "interleave_self_attention": d.interleave_self_attention,
        }
        out["vl_self_attention_cfg"] = self.vl_self_attention.to_json() if self.vl_self_attention.num_layers else None
        return out


__all__ = ["DEFAULT_BACKBONE", "Gr00tN1d7Config", "MODEL_TYPE", "N1D7_DIFFUSION_MODEL_CFG",
           "N1D7_VL_SELF_ATTENTION_CFG", "VLSelfAttentionConfig"]
