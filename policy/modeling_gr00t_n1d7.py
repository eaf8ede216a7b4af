"""GR00T N1.7, natively: the Qwen3-VL backbone, the action head's vision-language pre-stage, the whole model.

    backbone.model.model.visual           Qwen3-VL vision tower with deepstack (transformers' class)
    backbone.model.model.language_model   Qwen3-VL text model, cut to select_layer layers, no final norm
    action_head.vlln, .vl_self_attention  LayerNorm, then self-attention blocks over the VL tokens (pads masked)
    action_head.*                         the flow-matching head shared with N1.6 (policy.flow_matching)

`Gr00tN1d7` is built on the meta device and filled from the checkpoint tensor by tensor (`load_model`), as N1.6.

Backbone: transformers' own Qwen3-VL vision tower (with deepstack) and text model, the text model cut to the
checkpoint's `select_layer` decoder layers. The features are the output of the last kept layer BEFORE the text
model's final RMSNorm (that is where NVIDIA's N1.7 takes them; with transformers 5, `hidden_states[-1]` is
post-norm). Deepstack feature k is added to the image-token rows after decoder layer k, for the layers before the
last kept one (NVIDIA captures the last layer's output before its own deepstack addition). Weights come from the
checkpoint's `backbone.model.model.{visual,language_model}.*` tensors.

Pre-stage: the head's `vlln` LayerNorm and `vl_self_attention` (diffusers-style BasicTransformerBlocks with
layer_norm, the checkpoint's names `transformer_blocks.N.{norm1, attn1.to_q/k/v/to_out.0, norm3, ff.net.0.proj,
ff.net.2}`). A deliberate difference from NVIDIA's N1.7 and LeRobot's port: left-pad tokens are masked out as
keys of this self-attention, so a sample's answer never depends on its batch-mates (upstream lets pad tokens in,
and a padded sample's vision-language embeddings then move by O(1) with the other prompts of its batch). Pad
rows themselves are left as SDPA computes them (they attend to their sample's valid tokens); nothing downstream
reads them: the DiT's cross-attention masks them out. In the whole model the backbone's pad rows are zeroed
before the pre-stage (they are masked everywhere after it, so no valid row changes).

transformers' Qwen3-VL needs transformers >= 4.57; the pre-stage needs only torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_gr00t_n1d7 import Gr00tN1d7Config, VLSelfAttentionConfig
from .flow_matching import FlowMatchingActionHead
from .modeling_gr00t_n1d6 import load_weights, weight_files

MIN_TRANSFORMERS = (4, 57)
BACKBONE_PREFIX = "backbone.model.model."
HEAD_PREFIX = "action_head."
BACKBONE_CONFIG_FILE = "config.json"

# nvidia/Cosmos-Reason2-2B's backbone (the Qwen3-VL-2B-Instruct layout), the N1.7 default when no backbone config
# is given. Taken from the copy of its config.json that LeRobot 0.6.1 hard-codes (`_cosmos_reason2_qwen3_vl_config`)
# and consistent with Qwen3-VL-2B's published vision/text sizes. Rope settings are in the pre-5.0 `rope_scaling`
# form, which transformers 4.57 reads and 5.x converts.
COSMOS_REASON2_2B: dict[str, Any] = {
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 262144,
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
    },
    "vision_config": {
        "model_type": "qwen3_vl",
        "deepstack_visual_indexes": [5, 11, 17],
        "depth": 24,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


class N17ModelError(ValueError):
    """A checkpoint's tensors or config do not fit the N1.7 modules."""


# ----------------------------------------------------------------------------------------------------------------
# transformers' Qwen3-VL classes
# ----------------------------------------------------------------------------------------------------------------


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return major, minor


def qwen3_vl_classes():
    """(Qwen3VLConfig, Qwen3VLVisionModel, Qwen3VLTextModel), or an ImportError naming the version needed."""
    try:
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel, Qwen3VLVisionModel
    except ImportError as exc:
        import transformers

        raise ImportError(
            f"GR00T N1.7's backbone needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (Qwen3-VL); "
            f"installed: {transformers.__version__}"
        ) from exc
    return Qwen3VLConfig, Qwen3VLVisionModel, Qwen3VLTextModel


def read_backbone_config(path: str | Path | None) -> dict[str, Any]:
    """The Qwen3-VL config dict: `path` is the tokenizer dir holding config.json, or the json file itself;
    None gives Cosmos-Reason2-2B's."""
    if path is None:
        return json.loads(json.dumps(COSMOS_REASON2_2B))
    p = Path(path)
    if p.is_dir():
        p = p / BACKBONE_CONFIG_FILE
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise N17ModelError(f"{p}: missing (the Qwen3-VL backbone config)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise N17ModelError(f"{p}: cannot read ({exc})") from None
    if cfg.get("model_type") != "qwen3_vl":
        raise N17ModelError(f"{p}: model_type: expected 'qwen3_vl', got {cfg.get('model_type')!r}")
    for section in ("text_config", "vision_config"):
        if not isinstance(cfg.get(section), dict):
            raise N17ModelError(f"{p}: {section}: expected an object, got {type(cfg.get(section)).__name__}")
    return cfg


def _rope_for_installed_transformers(text: dict[str, Any]) -> None:
    # transformers 5 writes `rope_parameters` (theta inside); 4.57 reads only `rope_scaling` + `rope_theta`.
    params = text.get("rope_parameters")
    if params is None or _transformers_version() >= (5, 0):
        return
    params = dict(params)
    text.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
    text["rope_scaling"] = params
    del text["rope_parameters"]


def build_qwen3_vl_config(cfg: Mapping[str, Any], select_layer: int):
    """A `Qwen3VLConfig` with only the decoder layers N1.7 keeps (min(select_layer, num_hidden_layers)) and
    SDPA attention (what the reference ran; its fully masked left-pad rows come out as exactly 0)."""
    Qwen3VLConfig, _, _ = qwen3_vl_classes()
    d = json.loads(json.dumps(dict(cfg)))
    text = d["text_config"]
    n_layers = int(text.get("num_hidden_layers", 0))
    if select_layer < 1:
        raise N17ModelError(f"config.json select_layer: expected >= 1 (decoder layers kept), got {select_layer}")
    kept = min(select_layer, n_layers) if n_layers else select_layer
    text["num_hidden_layers"] = kept
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:kept]
    _rope_for_installed_transformers(text)
    config = Qwen3VLConfig(**d)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    return config


# ----------------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------------


class Gr00tN17Backbone(nn.Module):
    """Qwen3-VL cut at `select_layer`: (pixel_values, grids, tokens) -> pre-norm features of the last kept layer."""

    def __init__(self, config: Mapping[str, Any] | None = None, select_layer: int = 16):
        super().__init__()
        _, VisionModel, TextModel = qwen3_vl_classes()
        qcfg = build_qwen3_vl_config(config if config is not None else COSMOS_REASON2_2B, select_layer)
        self.config = qcfg
        self.image_token_id = int(qcfg.image_token_id)
        self.merge_size = int(qcfg.vision_config.spatial_merge_size)
        self.visual = VisionModel(qcfg.vision_config)
        self.language_model = TextModel(qcfg.text_config)
        # Features are taken before the final norm; without it the text model returns exactly them.
        self.language_model.norm = nn.Identity()
        self.num_layers = len(self.language_model.layers)
        # Deepstack k is added after layer k; the last kept layer's output is taken before its own addition.
        self.num_deepstack = min(len(qcfg.vision_config.deepstack_visual_indexes), self.num_layers - 1)
        self.eval()

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)

    def vision(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(merged image embeddings (tokens of all images, D), [deepstack features, each (tokens, D)])."""
        dtype = next(self.visual.parameters()).dtype
        out = self.visual(pixel_values.to(dtype), grid_thw=image_grid_thw)
        if isinstance(out, tuple):  # transformers 4.57
            merged, deepstack = out[0], out[1]
        else:
            merged, deepstack = out.pooler_output, out.deepstack_features
        return merged, list(deepstack)

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (features (B, L, D), valid_mask bool (B, L), image_mask bool (B, L)).

        `position_ids` are the (3, B, L) mRoPE (t, h, w) ids of the processor; (4, B, L) with a leading text row
        is accepted too."""
        valid_mask = attention_mask.bool()
        image_mask = input_ids == self.image_token_id
        merged, deepstack = self.vision(pixel_values, image_grid_thw)
        # Checked eagerly only: the count is a device-to-host sync, which compiled graphs must not have.
        n_slots = merged.shape[0] if torch.compiler.is_compiling() else int(image_mask.sum())
        if n_slots != merged.shape[0]:
            raise N17ModelError(
                f"input_ids: expected {merged.shape[0]} image tokens (id {self.image_token_id}) for "
                f"image_grid_thw {image_grid_thw.tolist()}, got {n_slots}"
            )
        embeds = self.language_model.embed_tokens(input_ids)
        embeds = embeds.masked_scatter(image_mask[..., None], merged.to(embeds.dtype))
        if position_ids.ndim != 3 or position_ids.shape[0] not in (3, 4) or position_ids.shape[1:] != input_ids.shape:
            raise N17ModelError(
                f"position_ids: expected (3, B, L) with (B, L) = {tuple(input_ids.shape)}, "
                f"got {tuple(position_ids.shape)}"
            )
        if position_ids.shape[0] == 3:
            # transformers reads a 4th, leading row as the text positions (used for masks and flash-attention
            # packing); N1.7 passes the temporal row there, and so do we, on every transformers version.
            position_ids = torch.cat([position_ids[:1], position_ids], dim=0)
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            visual_pos_masks=image_mask,
            deepstack_visual_embeds=[d.to(embeds.dtype) for d in deepstack[: self.num_deepstack]] or None,
            use_cache=False,
        )
        features = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return features, valid_mask, image_mask


def load_backbone_weights(
    backbone: Gr00tN17Backbone, tensors: Mapping[str, torch.Tensor], prefix: str = BACKBONE_PREFIX
) -> None:
    """Fill the backbone from a checkpoint's `backbone.model.model.{visual,language_model}.*` tensors.

    Decoder layers beyond the kept ones and the final norm (unused by N1.7) are skipped; anything else under the
    prefix that the backbone lacks, and anything it needs that is missing, is an error."""
    own = backbone.state_dict()
    layer_re = re.compile(r"language_model\.layers\.(\d+)\.")
    picked: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in tensors.items():
        if not name.startswith(prefix):
            continue
        local = name[len(prefix) :]
        if local in own:
            picked[local] = tensor
            continue
        m = layer_re.match(local)
        if local.startswith("language_model.norm.") or (m and int(m.group(1)) >= backbone.num_layers):
            continue
        unexpected.append(name)
    _check_and_load(backbone, own, picked, unexpected, prefix)


def _check_and_load(
    module: nn.Module,
    own: Mapping[str, torch.Tensor],
    picked: dict[str, torch.Tensor],
    unexpected: list[str],
    prefix: str,
) -> None:
    if unexpected:
        raise N17ModelError(
            f"checkpoint tensors: {len(unexpected)} under {prefix!r} that the N1.7 module does not have, e.g. "
            f"{sorted(unexpected)[:5]}"
        )
    missing = sorted(set(own) - set(picked))
    if missing:
        raise N17ModelError(
            f"checkpoint tensors: expected {len(own)} under {prefix!r}, {len(missing)} missing, e.g. "
            f"{[prefix + k for k in missing[:5]]}"
        )
    for key, tensor in picked.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise N17ModelError(
                f"checkpoint tensor {prefix + key}: expected shape {tuple(own[key].shape)}, got {tuple(tensor.shape)}"
            )
    module.load_state_dict(picked, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# Action head pre-stage: vlln + vl_self_attention
# ----------------------------------------------------------------------------------------------------------------


class _SelfAttention(nn.Module):
    """diffusers' `Attention` as N1.7 builds it (biases on q/k/v and out), run with a key-padding mask."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        # Index 1 is diffusers' dropout; inference only, and it keeps the checkpoint's `to_out.0` name.
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, length, self.heads * self.head_dim))


class _GeluProjection(nn.Module):
    """diffusers' GELU(approximate="tanh") projection: the checkpoint's `ff.net.0.proj`."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 / net.3 are diffusers' dropouts (inference only); they keep `net.2` where the checkpoint has it.
        inner = dim * mult
        self.net = nn.ModuleList([_GeluProjection(dim, inner), nn.Identity(), nn.Linear(inner, dim), nn.Identity()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class VLSelfAttentionBlock(nn.Module):
    """Pre-norm self-attention + feed-forward block (diffusers' BasicTransformerBlock, norm_type layer_norm)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = _SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = _FeedForward(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), key_mask)
        return x + self.ff(self.norm3(x))


class VLSelfAttention(nn.Module):
    """The head's `vl_self_attention`: blocks over the backbone tokens, left pads masked out as keys."""

    def __init__(self, cfg: VLSelfAttentionConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.transformer_blocks = nn.ModuleList(
            [VLSelfAttentionBlock(dim, cfg.num_attention_heads, cfg.attention_head_dim) for _ in range(cfg.num_layers)]
        )

    def forward(self, vl_embeds: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D), bool (B, L) -> (B, L, D). Upstream passes no mask; see the module docstring."""
        if valid_mask.shape != vl_embeds.shape[:2]:
            raise N17ModelError(
                f"valid_mask: expected shape {tuple(vl_embeds.shape[:2])}, got {tuple(valid_mask.shape)}"
            )
        key_mask = valid_mask.bool()[:, None, None, :]
        x = vl_embeds
        for block in self.transformer_blocks:
            x = block(x, key_mask)
        return x


class Gr00tN17VLPreStage(nn.Module):
    """`vlln` then `vl_self_attention`, under the names the checkpoint has below `action_head.`."""

    def __init__(self, embedding_dim: int, cfg: VLSelfAttentionConfig, use_vlln: bool = True):
        super().__init__()
        if cfg.num_layers > 0 and cfg.inner_dim != embedding_dim:
            raise N17ModelError(
                "config.json vl_self_attention_cfg: num_attention_heads * attention_head_dim must equal "
                f"backbone_embedding_dim {embedding_dim}, got {cfg.inner_dim}"
            )
        self.vlln = nn.LayerNorm(embedding_dim, eps=1e-5) if use_vlln else nn.Identity()
        self.vl_self_attention = VLSelfAttention(cfg) if cfg.num_layers > 0 else None
        self.eval()

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> "Gr00tN17VLPreStage":
        """From an N1.7 checkpoint's config.json."""
        if "backbone_embedding_dim" not in config:
            raise N17ModelError("config.json backbone_embedding_dim: expected an int, missing")
        return cls(
            int(config["backbone_embedding_dim"]),
            VLSelfAttentionConfig.from_json(config.get("vl_self_attention_cfg")),
            use_vlln=bool(config.get("use_vlln", True)),
        )

    def forward(self, features: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        x = self.vlln(features)
        return x if self.vl_self_attention is None else self.vl_self_attention(x, valid_mask)


def load_prestage_weights(
    prestage: Gr00tN17VLPreStage, tensors: Mapping[str, torch.Tensor], prefix: str = HEAD_PREFIX
) -> None:
    """Fill `vlln` and `vl_self_attention` from the checkpoint's `action_head.{vlln,vl_self_attention}.*`."""
    own = prestage.state_dict()
    picked: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in tensors.items():
        if not name.startswith(prefix):
            continue
        local = name[len(prefix) :]
        if not local.startswith(("vlln.", "vl_self_attention.")):
            continue  # the rest of the head (DiT, encoders, decoder) is loaded elsewhere
        if local in own:
            picked[local] = tensor
        else:
            unexpected.append(name)
    _check_and_load(prestage, own, picked, unexpected, prefix)


# ----------------------------------------------------------------------------------------------------------------
# The whole model: backbone -> vlln -> VL self-attention (masked) -> the shared flow-matching head
# ----------------------------------------------------------------------------------------------------------------


class _Nest(nn.Module):
    """Only here for the checkpoint's ``backbone.model.model`` nesting."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class Gr00tN1d7ActionHead(FlowMatchingActionHead):
    """The shared flow-matching head (policy.flow_matching) with N1.7's VL self-attention after ``vlln``.

    Checkpoint names below ``action_head.``: ``vlln``, ``vl_self_attention.transformer_blocks.N.*``, then the
    DiT (``model.*``), the per-embodiment encoders / decoder and ``position_embedding``, as N1.6's head."""

    def __init__(self, config: Gr00tN1d7Config):
        super().__init__(config)
        vsa = config.vl_self_attention
        self.vl_self_attention = VLSelfAttention(vsa) if vsa.num_layers > 0 else None

    def vl_embeds(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) backbone features, bool (B, L) valid tokens -> the DiT's cross-attention context."""
        x = self.vlln(features)
        return x if self.vl_self_attention is None else self.vl_self_attention(x, valid)


class Gr00tN1d7(nn.Module):
    """GR00T N1.7 for inference: ``forward(**processor inputs, noise)`` -> normalised actions, float32
    (B, action_horizon, max_action_dim)."""

    def __init__(self, config: Gr00tN1d7Config, backbone_config: Mapping[str, Any] | None = None):
        super().__init__()
        qwen = read_backbone_config(None) if backbone_config is None else dict(backbone_config)
        text = qwen["text_config"]
        self.source_layers = int(text.get("num_hidden_layers", config.select_layer))
        if config.select_layer > self.source_layers:
            raise N17ModelError(
                f"config.json select_layer {config.select_layer} > the backbone's {self.source_layers} text layers"
            )
        if int(text.get("hidden_size", -1)) != config.backbone_embedding_dim:
            raise N17ModelError(
                f"config.json backbone_embedding_dim {config.backbone_embedding_dim} != the backbone's text hidden_size "
                f"{text.get('hidden_size')}; pass the checkpoint's backbone_config (its model_name folder's config.json)"
            )
        self.config = config
        self.backbone = _Nest(_Nest(Gr00tN17Backbone(qwen, config.select_layer)))
        self.action_head = Gr00tN1d7ActionHead(config)
        self.eval()

    @property
    def qwen(self) -> Gr00tN17Backbone:
        return self.backbone.model.model

    def unused_prefixes(self) -> tuple[str, ...]:
        """Checkpoint tensors inference never reads: decoder layers above select_layer, the final norm (features
        are taken before it) and the tied LM head (some writers keep it)."""
        layers = tuple(f"{BACKBONE_PREFIX}language_model.layers.{i}." for i in range(self.qwen.num_layers, self.source_layers))
        return layers + (f"{BACKBONE_PREFIX}language_model.norm.", "backbone.model.lm_head.", f"{BACKBONE_PREFIX}lm_head.")

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        state: torch.Tensor,
        embodiment_id: int | torch.Tensor,
        noise: torch.Tensor,
        trace: dict | None = None,
        update_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features, valid, image = self.qwen(pixel_values, image_grid_thw, input_ids, attention_mask, position_ids)
        if trace is not None:
            trace["backbone.features"] = features
        # Left-pad rows are never attended to (masked keys here and in the DiT); zeroed so that nothing
        # non-finite a kernel might leave there can ride on 0 * x into a valid row.
        features = torch.where(valid.unsqueeze(-1), features, 0.0)
        vl = self.action_head.vl_embeds(features, valid)
        if trace is not None:
            trace["head.vl_embeds"] = vl
        return self.action_head.sample(vl, valid, image, state, embodiment_id, noise, trace, update_weights)


def materialize_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Rebuild, on ``device``, the modules a meta-device construction left with meta buffers: transformers'
    rotary embeddings (their inverse frequencies are computed at construction, not stored in checkpoints)."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        with torch.device(device):
            config = getattr(module, "config", None)
            if config is not None:
                fresh = type(module)(config)
            elif isinstance(getattr(module, "inv_freq", None), torch.Tensor):  # transformers 4.57's vision rope
                fresh = type(module)(2 * module.inv_freq.numel())
            else:
                raise N17ModelError(f"{name}: a buffer was left on the meta device and cannot be rebuilt")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, fresh)


def load_model(
    path: Path, config: Gr00tN1d7Config, backbone_config: Mapping[str, Any] | None, *, dtype: torch.dtype, device: Any
) -> Gr00tN1d7:
    """The checkpoint at ``path`` as a ready model: built on the meta device, each tensor read once straight into
    ``dtype`` on ``device`` (a 3B checkpoint is never in memory twice), eval mode."""
    with torch.device("meta"):
        model = Gr00tN1d7(config, backbone_config)
    load_weights(model, weight_files(path), dtype=dtype, device=device, unused=model.unused_prefixes())
    materialize_buffers(model, device)
    return model.eval()
