"""Configuration of the native fleetserve policy model, in the GR00T N1.6 shape.

``FleetGr00tConfig`` is a composite transformers config:

* ``vision_config`` -- a ``SiglipVisionConfig`` (SigLIP vision tower),
* ``llm_config`` -- a ``Qwen3Config`` (the language model; only its first ``select_layer`` decoder layers are
  built, the upper layers are cut as GR00T does),
* flat fields for the flow-matching DiT action head.

Both sub-configs are stored as dicts in ``config.json`` and rebuilt as config objects on load. The class is
written in the plain ``__init__`` style that transformers 4.53 (GR00T N1.6's pin) and 5.x both accept.

Widths of the action head, as in GR00T (N1.5/N1.6 ``FlowmatchingActionHead``):

* ``num_attention_heads * attention_head_dim`` is the DiT *inner* width (GR00T's ``input_embedding_dim``): the
  width of the state / action tokens, of the timestep embedding and of every attention and MLP block,
* ``hidden_size`` is the DiT *output* width (GR00T's ``output_dim`` / action-head ``hidden_size``) and the
  hidden width of the per-embodiment state encoder and action decoder MLPs.

For the released N1.6-3B sizes ("DiT 32 layers, 32 heads x 48, hidden 1024") that gives an inner width of 1536
and an output / MLP width of 1024, which is exactly how GR00T's config reads.

Presets (``FleetGr00tConfig.from_preset(name, **overrides)``): ``"tiny"`` (tests), ``"small"`` (CPU demo,
the default values of the dataclass), ``"n16-3b"`` (released GR00T N1.6-3B sizes, for GPU benchmarks).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig, Qwen3Config, SiglipVisionConfig

MODEL_TYPE = "fleet_gr00t"

# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------

_SMALL_VISION: dict[str, Any] = dict(
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_channels=3,
    image_size=224,
    patch_size=16,
    vision_use_head=False,
)

_SMALL_LLM: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    use_cache=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_channels=3,
            image_size=32,
            patch_size=8,
            vision_use_head=False,
        ),
        image_size=32,
        pixel_shuffle_factor=2,
        llm_config=dict(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            use_cache=False,
        ),
        select_layer=1,
        backbone_embedding_dim=32,
        action_horizon=16,
        max_state_dim=64,
        max_action_dim=32,
        max_num_embodiments=32,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
    ),
    "small": dict(
        vision_config=dict(_SMALL_VISION),
        image_size=224,
        pixel_shuffle_factor=2,
        llm_config=dict(_SMALL_LLM),
        select_layer=4,
        backbone_embedding_dim=512,
        action_horizon=16,
        max_state_dim=64,
        max_action_dim=32,
        max_num_embodiments=32,
        hidden_size=512,
        num_layers=8,
        num_attention_heads=8,
        attention_head_dim=64,
    ),
    # Released GR00T N1.6-3B sizes: SigLIP-so400m-like vision tower, Qwen3-1.7B-like LLM (28 layers, cut at 16),
    # backbone width 2048, DiT 32 layers x (32 heads x 48 = 1536 inner), output / MLP width 1024.
    "n16-3b": dict(
        vision_config=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_channels=3,
            image_size=224,
            patch_size=14,
            vision_use_head=False,
        ),
        image_size=224,
        pixel_shuffle_factor=2,
        llm_config=dict(
            vocab_size=151680,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
            use_cache=False,
        ),
        select_layer=16,
        backbone_embedding_dim=2048,
        action_horizon=16,
        max_state_dim=128,
        max_action_dim=32,
        max_num_embodiments=32,
        hidden_size=1024,
        num_layers=32,
        num_attention_heads=32,
        attention_head_dim=48,
    ),
}


class FleetGr00tConfig(PretrainedConfig):
    r"""Config of :class:`policy.modeling.FleetGr00tModel` (GR00T N1.6-shaped VLA policy).

    Backbone:
        vision_config: ``SiglipVisionConfig`` (or its dict). ``vision_config.image_size`` is kept equal to
            ``image_size``.
        image_size: square side (pixels) the processor resizes every camera image to.
        pixel_shuffle_factor: space-to-depth factor applied to the vision patch grid before projecting to the LLM
            (Eagle's pixel shuffle with ``downsample_ratio = 1 / factor``); 1 disables it. Image tokens per image:
            ``(image_size // patch_size // pixel_shuffle_factor) ** 2``.
        llm_config: ``Qwen3Config`` (or its dict). Text vocabulary size: ``llm_config.vocab_size``.
        select_layer: number of LLM decoder layers kept (the first ``select_layer``; upper layers are cut).
        backbone_embedding_dim: width of the backbone features fed to the action head.

    Action head (flow-matching DiT):
        action_horizon, max_state_dim, max_action_dim, max_num_embodiments: shapes (states / actions are
            zero-padded to ``max_state_dim`` / ``max_action_dim``; embodiment ids are ``< max_num_embodiments``).
        hidden_size: DiT output width and hidden width of the per-embodiment state encoder / action decoder MLPs.
        num_layers, num_attention_heads, attention_head_dim: DiT depth and attention shape; the DiT inner width
            (state / action token width) is ``num_attention_heads * attention_head_dim``.
        interleave_self_attention: as GR00T, even DiT blocks cross-attend to the backbone features and odd blocks
            self-attend over the [state, action] tokens; if False every block does both.
        mlp_ratio: DiT feed-forward expansion.
        num_inference_timesteps: Euler steps at inference (t from 0 = noise to 1 = actions).
        num_timestep_buckets: t is discretised to ``int(t * num_timestep_buckets)`` for the timestep embedding.
        timestep_embedding_channels: sinusoidal channels of the timestep embedding before its MLP.
        noise_beta_alpha, noise_beta_beta, noise_s: GR00T's training-time t distribution (unused at inference).
        initializer_range: std of the normal init of linear / embedding / per-embodiment weights.
    """

    model_type = MODEL_TYPE
    # transformers 4.x reads ``sub_configs`` to serialise the nested configs; 5.x keeps it as the backwards-
    # compatible form of ``sub_configs_defaults``. A plain ``__init__`` (not 5.x's dataclass fields) is the one
    # config style both majors accept, so the same class loads beside GR00T's transformers 4.53 pin.
    sub_configs = {"vision_config": SiglipVisionConfig, "llm_config": Qwen3Config}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        image_size: int | None = None,
        pixel_shuffle_factor: int = 2,
        llm_config: dict | PretrainedConfig | None = None,
        select_layer: int = 4,
        backbone_embedding_dim: int = 512,
        action_horizon: int = 16,
        max_state_dim: int = 64,
        max_action_dim: int = 32,
        max_num_embodiments: int = 32,
        hidden_size: int = 512,
        num_layers: int = 8,
        num_attention_heads: int = 8,
        attention_head_dim: int = 64,
        interleave_self_attention: bool = True,
        mlp_ratio: int = 4,
        norm_eps: float = 1e-5,
        num_inference_timesteps: int = 4,
        num_timestep_buckets: int = 1000,
        timestep_embedding_channels: int = 256,
        noise_beta_alpha: float = 1.5,
        noise_beta_beta: float = 1.0,
        noise_s: float = 0.999,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.vision_config = _sub_config(SiglipVisionConfig, vision_config, _SMALL_VISION, "vision_config")
        self.llm_config = _sub_config(Qwen3Config, llm_config, _SMALL_LLM, "llm_config")
        self.image_size = image_size
        self.pixel_shuffle_factor = int(pixel_shuffle_factor)
        self.select_layer = int(select_layer)
        self.backbone_embedding_dim = int(backbone_embedding_dim)
        self.action_horizon = int(action_horizon)
        self.max_state_dim = int(max_state_dim)
        self.max_action_dim = int(max_action_dim)
        self.max_num_embodiments = int(max_num_embodiments)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.attention_head_dim = int(attention_head_dim)
        self.interleave_self_attention = bool(interleave_self_attention)
        self.mlp_ratio = int(mlp_ratio)
        self.norm_eps = float(norm_eps)
        self.num_inference_timesteps = int(num_inference_timesteps)
        self.num_timestep_buckets = int(num_timestep_buckets)
        self.timestep_embedding_channels = int(timestep_embedding_channels)
        self.noise_beta_alpha = float(noise_beta_alpha)
        self.noise_beta_beta = float(noise_beta_beta)
        self.noise_s = float(noise_s)
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        vc = self.vision_config
        if self.image_size is None:
            self.image_size = int(vc.image_size)
        else:
            self.image_size = int(self.image_size)
            vc.image_size = self.image_size
        if self.image_size % vc.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {vc.patch_size}")
        grid = self.image_size // vc.patch_size
        if self.pixel_shuffle_factor < 1 or grid % self.pixel_shuffle_factor:
            raise ValueError(f"patch grid {grid} is not divisible by pixel_shuffle_factor {self.pixel_shuffle_factor}")
        if not 1 <= self.select_layer <= self.llm_config.num_hidden_layers:
            raise ValueError(
                f"select_layer {self.select_layer} must be in [1, llm_config.num_hidden_layers="
                f"{self.llm_config.num_hidden_layers}]"
            )
        if self.max_num_embodiments < 1:
            raise ValueError("max_num_embodiments must be >= 1")

    # ---- derived sizes ---------------------------------------------------------------------------------------
    @property
    def dit_inner_dim(self) -> int:
        """Width of the DiT tokens (GR00T's ``input_embedding_dim``)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def vocab_size(self) -> int:
        return self.llm_config.vocab_size

    @property
    def num_image_tokens(self) -> int:
        """Backbone tokens per image (after pixel shuffle)."""
        grid = self.image_size // self.vision_config.patch_size // self.pixel_shuffle_factor
        return grid * grid

    def llm_config_truncated(self) -> PretrainedConfig:
        """``llm_config`` with only the first ``select_layer`` layers (what the model actually builds)."""
        d = self.llm_config.to_dict()
        n = int(self.select_layer)
        d["num_hidden_layers"] = n
        if d.get("layer_types") is not None:
            d["layer_types"] = list(d["layer_types"])[:n]
        d.pop("model_type", None)
        d.pop("transformers_version", None)
        cfg = type(self.llm_config)(**d)
        cfg._attn_implementation = self.llm_config._attn_implementation
        return cfg

    # ---- presets -----------------------------------------------------------------------------------------------
    @classmethod
    def preset_names(cls) -> list[str]:
        return list(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FleetGr00tConfig":
        """Build a preset config. ``overrides`` replace top-level fields; ``vision_config`` / ``llm_config``
        overrides given as dicts are merged into the preset's sub-config dicts."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kw = copy.deepcopy(PRESETS[name])
        for sub in ("vision_config", "llm_config"):
            if sub in overrides and isinstance(overrides[sub], dict):
                kw[sub].update(overrides.pop(sub))
        if "image_size" in overrides:
            kw["vision_config"]["image_size"] = overrides["image_size"]
        kw.update(overrides)
        return cls(**kw)


def _sub_config(cls, value, defaults: dict[str, Any], field: str) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        value = dict(defaults)
    if not isinstance(value, dict):
        raise TypeError(f"{field}: expected a dict or a {cls.__name__}, got {type(value).__name__}")
    value = dict(value)
    value.pop("model_type", None)
    # transformers 5 writes RoPE as ``rope_parameters`` and 4.x reads ``rope_theta``: copy the frequency base over
    # so that a checkpoint written by 5.x loads with the same frequencies in 4.x (5.x converts 4.x's field itself).
    rope = value.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and not hasattr(cls(), "rope_parameters"):
        value.setdefault("rope_theta", rope["rope_theta"])
    return cls(**value)


def _register() -> None:
    try:
        AutoConfig.register(MODEL_TYPE, FleetGr00tConfig)
    except ValueError:  # already registered (module imported twice / by another name)
        pass


_register()

__all__ = ["FleetGr00tConfig", "PRESETS", "MODEL_TYPE"]
