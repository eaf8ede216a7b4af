"""GR00T N1.6, natively: NVIDIA's architecture in our own code, loading NVIDIA's checkpoints as they are.

    backbone.model.vision_model.vision_model   SigLIP2-variant ViT: linear patch embedding over (row, col,
                                               channel)-ordered patches, the learned position table resized to
                                               the image's patch grid, full attention within each image,
                                               post-layernorm
    backbone.model.mlp1                        2x2 pixel unshuffle (channel c*4 + dy*2 + dx), then LayerNorm ->
                                               Linear -> GELU -> Linear
    backbone.model.language_model.model        Qwen3 cut to ``select_layer`` layers, final RMSNorm; image
                                               tokens replace the embeddings of the <IMG_CONTEXT> ids; causal +
                                               padding mask, positions 0..L-1 counting the left padding
    action_head                                policy.flow_matching (AlternateVLDiT head)

The backbone's features are the LLM's last hidden state (after the final norm). Only the parts inference uses
are built: the LM head and the vision tower's pooling head, which checkpoints may hold, are skipped on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_gr00t_n1d6 import EagleBackboneConfig, Gr00tN1d6Config, Qwen3TextConfig, SiglipVisionConfig
from .flow_matching import FlowMatchingActionHead

# ----------------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------------


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def positions(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        """The position table resized (bilinear, antialiased, in float32) to a grid_h x grid_w patch grid.

        Depends on the weights and the grid alone, so it is computed once per grid and dtype and kept.
        """
        key = (grid_h, grid_w, dtype, self.position_embedding.weight.device)
        cache = self.__dict__.setdefault("_position_cache", {})
        if key not in cache:
            n = self.cfg.position_grid
            with torch.inference_mode(False), torch.no_grad():
                table = self.position_embedding.weight.float().reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
                table = F.interpolate(table, size=(grid_h, grid_w), mode="bilinear", align_corners=False, antialias=True)
                cache[key] = table.reshape(-1, grid_h * grid_w).transpose(0, 1).to(dtype).contiguous()
        return cache[key]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images of one size -> (N, (H/p)(W/p), hidden): patches in raster order."""
        n, c, h, w = pixel_values.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        patches = pixel_values.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * c)
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        return x + self.positions(gh, gw, x.dtype)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, s, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(n, s, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W), one size -> (N, patches, hidden). Each image attends within itself only: one image is
        one sequence of the batch (NVIDIA packs them and runs block-diagonal attention: the same maths)."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    """Only here for the checkpoint's ``vision_model.vision_model`` nesting."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Qwen3 (the first select_layer layers)
# ----------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim) of RoPE at ``positions``, computed in float32 (as transformers does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x: torch.Tensor, rope, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3TextConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Last hidden state (after the final norm). Positions 0..L-1 for every sample, left padding included,
        as NVIDIA's backbone runs it (RoPE is relative: a padded sample moves only by rounding)."""
        b, s, _ = embeds.shape
        positions = torch.arange(s, device=embeds.device)
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        causal = torch.ones(s, s, dtype=torch.bool, device=embeds.device).tril()
        mask = causal[None] & valid[:, None, :]
        # A left-pad query sees no key at all; let it see itself so its (unused) row stays finite.
        mask = mask | (torch.eye(s, dtype=torch.bool, device=embeds.device)[None] & ~valid[:, :, None])
        mask = mask[:, None]
        x = embeds
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """Only here for the checkpoint's ``language_model.model`` nesting (the LM head is never used)."""

    def __init__(self, cfg: Qwen3TextConfig, num_layers: int):
        super().__init__()
        self.model = Qwen3Model(cfg, num_layers)


# ----------------------------------------------------------------------------------------------------------------
# Backbone and model
# ----------------------------------------------------------------------------------------------------------------


class Eagle3VL(nn.Module):
    def __init__(self, cfg: EagleBackboneConfig, llm_layers: int):
        super().__init__()
        self.cfg = cfg
        vit = cfg.vision.hidden_size * cfg.unshuffle**2
        llm = cfg.text.hidden_size
        self.vision_model = SiglipVisionModel(cfg.vision)
        self.mlp1 = nn.Sequential(nn.LayerNorm(vit), nn.Linear(vit, llm), nn.GELU(), nn.Linear(llm, llm))
        self.language_model = Qwen3ForCausalLM(cfg.text, llm_layers)

    def image_tokens(self, pixel_values: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """(N, C, H, W) images of one size -> (N, tokens per image, llm hidden)."""
        feats = self.vision_model.vision_model(pixel_values)
        n, _, c = feats.shape
        p = self.cfg.vision.patch_size
        gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        grid = feats.transpose(1, 2).reshape(n, c, gh, gw)
        unshuffled = F.pixel_unshuffle(grid, self.cfg.unshuffle).flatten(2).transpose(1, 2)
        tokens = self.mlp1(unshuffled)
        if trace is not None:
            trace["vision.tower_out"] = feats
            trace["vision.mlp1_out"] = tokens
        return tokens

    def forward(self, images: list[torch.Tensor], input_ids: torch.Tensor, valid: torch.Tensor,
                trace: dict | None = None) -> torch.Tensor:
        """images: the batch's images in prompt order, as groups of one size each ((N_g, C, H, W)); the
        embeddings at the <IMG_CONTEXT> ids are replaced by their tokens, in that order."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if images:
            tokens = torch.cat([self.image_tokens(group, trace).flatten(0, 1) for group in images], dim=0)
            slots = input_ids == self.cfg.image_token_index
            # Checked eagerly only: the count is a device-to-host sync, which compiled graphs must not have.
            if not torch.compiler.is_compiling() and int(slots.sum()) != tokens.shape[0]:
                raise ValueError(
                    f"input_ids: {int(slots.sum())} <IMG_CONTEXT> slots for {tokens.shape[0]} image tokens "
                    "(the prompt and the images disagree)"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), tokens.to(embeds.dtype))
        return self.language_model.model(embeds, valid)


class EagleBackbone(nn.Module):
    def __init__(self, cfg: EagleBackboneConfig, llm_layers: int):
        super().__init__()
        self.model = Eagle3VL(cfg, llm_layers)


class Gr00tN1d6(nn.Module):
    """GR00T N1.6 for inference. :meth:`get_action` maps preprocessed inputs to normalised actions."""

    # Tensors a checkpoint may hold that inference never reads.
    UNUSED_PREFIXES = (
        "backbone.model.language_model.lm_head.",
        "backbone.model.vision_model.vision_model.head.",
        "action_head.mask_token",
    )

    def __init__(self, config: Gr00tN1d6Config, backbone_config: EagleBackboneConfig):
        super().__init__()
        if config.select_layer > backbone_config.text.num_hidden_layers:
            raise ValueError(
                f"config.json select_layer {config.select_layer} > the backbone's {backbone_config.text.num_hidden_layers} "
                f"text layers ({backbone_config.source})"
            )
        if config.backbone_embedding_dim != backbone_config.text.hidden_size:
            raise ValueError(
                f"config.json backbone_embedding_dim {config.backbone_embedding_dim} != the backbone's text hidden_size "
                f"{backbone_config.text.hidden_size} ({backbone_config.source}); pass the checkpoint's backbone_config"
            )
        self.config = config
        self.backbone_config = backbone_config
        self.backbone = EagleBackbone(backbone_config, config.select_layer)
        self.action_head = FlowMatchingActionHead(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.action_head.model.proj_out_2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.action_head.model.proj_out_2.weight.device

    def forward(self, images: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                state: torch.Tensor, embodiment_id: int | torch.Tensor, noise: torch.Tensor,
                trace: dict | None = None, update_weights: torch.Tensor | None = None) -> torch.Tensor:
        valid = attention_mask.bool()
        image = input_ids == self.backbone_config.image_token_index
        features = self.backbone.model(images, input_ids, valid, trace)
        # Rows of left padding are never attended to; zero them so nothing non-finite can ride on 0 * x.
        features = torch.where(valid.unsqueeze(-1), features, 0.0)
        vl = self.action_head.vlln(features)
        if trace is not None:
            trace["backbone.backbone_features"] = features
            trace["action_head.vl_embeds"] = vl
        return self.action_head.sample(vl, valid, image, state, embodiment_id, noise, trace, update_weights)

    @torch.inference_mode()
    def get_action(self, images, input_ids, attention_mask, state, embodiment_id, noise) -> torch.Tensor:
        """Normalised actions (B, action_horizon, max_action_dim), float32 whatever the model dtype."""
        return self.forward(images, input_ids, attention_mask, state, embodiment_id, noise)


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards its index names."""
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return [path / s for s in shards]
    raise FileNotFoundError(f"{single}: file is missing (no model weights in the directory)")


def load_weights(model: nn.Module, files: Iterable[Path], *, dtype: torch.dtype, device: Any,
                 unused: tuple[str, ...]) -> None:
    """Fill ``model``'s parameters (built on the meta device) from the checkpoint, cast to ``dtype`` on ``device``,
    one tensor at a time, so a 3B checkpoint never sits in memory twice. Every parameter must be found; tensors
    inference does not use are skipped; any other tensor is an error (the architecture does not match)."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    seen: set[str] = set()
    extra: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.startswith(unused):
                    continue
                target = params.get(name)
                if target is None:
                    extra.append(name)
                    continue
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{file}: tensor {name} has shape {tuple(t.shape)}, the model expects {tuple(target.shape)} "
                        "(check the backbone_config and config.json)"
                    )
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._parameters[leaf] = nn.Parameter(t.to(device=device, dtype=dtype),
                                                                           requires_grad=False)
                seen.add(name)
    missing = sorted(set(params) - seen)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing, e.g. {', '.join(missing[:4])}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:4])}")
        raise ValueError("; ".join(parts) + " (the checkpoint does not match this architecture; check backbone_config)")


def load_model(path: Path, config: Gr00tN1d6Config, backbone_config: EagleBackboneConfig, *, dtype: torch.dtype,
               device: Any) -> Gr00tN1d6:
    """The checkpoint at ``path`` as a ready model (eval mode, weights in ``dtype`` on ``device``)."""
    with torch.device("meta"):
        model = Gr00tN1d6(config, backbone_config)
    load_weights(model, weight_files(path), dtype=dtype, device=device, unused=Gr00tN1d6.UNUSED_PREFIXES)
    return model.eval()


__all__ = ["Gr00tN1d6", "load_model", "load_weights", "weight_files"]
