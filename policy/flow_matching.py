"""GR00T's flow-matching action head (N1.6, and N1.7 with its VL self-attention in front), at inference.

Module and parameter names are NVIDIA's (``action_head.model.transformer_blocks.3.attn1.to_q.weight``, ...), so
the checkpoint's tensors load as they are. The maths follows NVIDIA's N1.6 code (diffusers-style DiT blocks):

* the backbone features go through ``vlln`` (LayerNorm); the state through the per-embodiment ``state_encoder``;
* from the initial noise x0 (B, action_horizon, max_action_dim), ``num_inference_timesteps`` Euler steps
  x <- x + dt * v(x, t) with t = k/N discretised to int(t * num_timestep_buckets);
* v(x, t): action tokens ``W3(swish(W2([W1(x), sinus(t)])))`` (+ learned positions), appended to the state
  token(s), through the DiT conditioned on t (AdaLN), then the per-embodiment ``action_decoder``; the last
  ``action_horizon`` rows are the velocity.
* DiT blocks: odd blocks self-attend; even blocks cross-attend to the VL tokens -- with
  ``use_alternate_vl_dit`` to the valid non-image (text) tokens when ``i % (2 * attend_text_every_n_blocks) ==
  0`` and to the valid image tokens otherwise.

What is computed once per call, not once per Euler step: the VL features' keys and values of every
cross-attention block, the attention masks, the state tokens, and the timestep embeddings (constant per step).

Precision: the weights run in the model's dtype; x0, the Euler integration and the returned actions stay in
float32 (NVIDIA keeps x in the model dtype: in bf16 that rounds the small late updates away).

Deliberate difference from upstream: NVIDIA's plain (non-alternating) DiT cross-attends to every VL token,
left padding included, so a padded sample's actions depend on its batch-mates; here padding is always masked.
At B=1 (no padding) the two are the same.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_gr00t_n1d6 import DiTConfig

# ----------------------------------------------------------------------------------------------------------------
# Embodiment-conditioned layers
# ----------------------------------------------------------------------------------------------------------------


class CategorySpecificLinear(nn.Module):
    """One weight matrix per embodiment: ``W`` (K, in, out), ``b`` (K, out).

    ``cat_ids`` is an ``int`` when the whole batch is one embodiment (every replica serves one): a plain matmul
    with that slice, nothing gathered. A (B,) tensor gathers one matrix per sample (NVIDIA's general form).
    """

    def __init__(self, num_categories: int, in_features: int, out_features: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(num_categories, in_features, out_features))
        self.b = nn.Parameter(torch.empty(num_categories, out_features))

    def forward(self, x: torch.Tensor, cat_ids: int | torch.Tensor) -> torch.Tensor:
        if isinstance(cat_ids, int):
            return torch.matmul(x, self.W[cat_ids]) + self.b[cat_ids]
        return torch.bmm(x, self.W[cat_ids]) + self.b[cat_ids].unsqueeze(1)


class CategorySpecificMLP(nn.Module):
    def __init__(self, num_categories: int, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.layer1 = CategorySpecificLinear(num_categories, in_features, hidden)
        self.layer2 = CategorySpecificLinear(num_categories, hidden, out_features)

    def forward(self, x: torch.Tensor, cat_ids: int | torch.Tensor) -> torch.Tensor:
        return self.layer2(F.relu(self.layer1(x, cat_ids)), cat_ids)


def action_time_encoding(t_bucket: torch.Tensor, width: int) -> torch.Tensor:
    """The action encoder's sinusoidal code of the timestep bucket: [sin, cos], frequencies 10000^(-j/half)."""
    half = width // 2
    exponent = -torch.arange(half, dtype=torch.float32, device=t_bucket.device) * (math.log(10000.0) / half)
    freqs = t_bucket.float().unsqueeze(-1) * exponent.exp()
    return torch.cat([torch.sin(freqs), torch.cos(freqs)], dim=-1)


class MultiEmbodimentActionEncoder(nn.Module):
    def __init__(self, action_dim: int, hidden_size: int, num_embodiments: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.W1 = CategorySpecificLinear(num_embodiments, action_dim, hidden_size)
        self.W2 = CategorySpecificLinear(num_embodiments, 2 * hidden_size, hidden_size)
        self.W3 = CategorySpecificLinear(num_embodiments, hidden_size, hidden_size)

    def forward(self, actions: torch.Tensor, tau: torch.Tensor, cat_ids: int | torch.Tensor) -> torch.Tensor:
        """actions (B, H, A); tau: the step's time encoding (1, width), the same for every sample and row."""
        a = self.W1(actions, cat_ids)
        tau = tau.to(a.dtype).unsqueeze(1).expand(a.shape[0], a.shape[1], self.hidden_size)
        return self.W3(F.silu(self.W2(torch.cat([a, tau], dim=-1), cat_ids)), cat_ids)


# ----------------------------------------------------------------------------------------------------------------
# DiT (diffusers-style blocks)
# ----------------------------------------------------------------------------------------------------------------


def timestep_projection(t_bucket: torch.Tensor, channels: int = 256) -> torch.Tensor:
    """diffusers ``Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=1)``: [cos, sin]."""
    half = channels // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t_bucket.device) / (half - 1)
    args = t_bucket.float().unsqueeze(-1) * torch.exp(exponent)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEncoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def forward(self, t_bucket: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_projection(t_bucket).to(dtype))


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine (eps 1e-5), then ``* (1 + scale) + shift``, (scale, shift) from Linear(SiLU(temb))."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return scale.unsqueeze(1), shift.unsqueeze(1)

    def forward(self, x: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, shift = modulation
        return self.norm(x) * (1 + scale) + shift


class Attention(nn.Module):
    """diffusers ``Attention`` with SDPA; ``kv_dim`` for cross-attention (whose K/V are computed once per call)."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int | None = None, bias: bool = True,
                 out_bias: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        kv_dim = dim if kv_dim is None else kv_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias)])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.to_k(context)), self._heads(self.to_v(context))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self._heads(self.to_q(x))
        k, v = self.kv(x) if kv is None else kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.head_dim))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """diffusers ``FeedForward``: net.0 = Linear + GELU, net.1 dropout (nothing at inference), net.2 Linear."""

    def __init__(self, dim: int, activation_fn: str = "gelu-approximate", mult: int = 4):
        super().__init__()
        inner = mult * dim
        approximate = "tanh" if activation_fn == "gelu-approximate" else "none"
        self.net = nn.ModuleList([GELUProjection(dim, inner, approximate), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """diffusers ``SinusoidalPositionalEmbedding`` table: sin on even channels, cos on odd ones."""
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class BasicTransformerBlock(nn.Module):
    """norm1 -> attn1 (self- or cross-attention) -> residual; norm3 -> ff -> residual.

    ``ada_norm`` (the DiT): norm1 is an AdaLayerNorm on the timestep embedding; ``layer_norm`` (N1.7's VL
    self-attention): plain LayerNorms.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, cross_attention_dim: int | None, ada_norm: bool,
                 attention_bias: bool = True, activation_fn: str = "gelu-approximate",
                 norm_elementwise_affine: bool = False, norm_eps: float = 1e-5, sinusoidal_positions: int = 0):
        super().__init__()
        self.ada_norm = ada_norm
        self.is_cross = cross_attention_dim is not None
        self.norm1 = AdaLayerNorm(dim) if ada_norm else nn.LayerNorm(dim, eps=norm_eps,
                                                                       elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, heads, head_dim, kv_dim=cross_attention_dim, bias=attention_bias)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, activation_fn)
        self.sinusoidal_positions = sinusoidal_positions  # 0: none; else the table's length

    def forward(self, x: torch.Tensor, modulation=None, kv=None, mask=None) -> torch.Tensor:
        h = self.norm1(x, modulation) if self.ada_norm else self.norm1(x)
        if self.sinusoidal_positions:
            h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device).to(h.dtype)
        x = x + self.attn1(h, kv=kv, mask=mask)
        return x + self.ff(self.norm3(x))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig, cross_attention_dim: int):
        super().__init__()
        dim = cfg.inner_dim
        self.timestep_encoder = TimestepEncoder(dim)
        blocks = []
        for i in range(cfg.num_layers):
            self_attn = cfg.interleave_self_attention and i % 2 == 1
            blocks.append(BasicTransformerBlock(
                dim, cfg.num_attention_heads, cfg.attention_head_dim,
                cross_attention_dim=None if self_attn else cross_attention_dim, ada_norm=True,
                attention_bias=cfg.attention_bias, activation_fn=cfg.activation_fn,
                norm_elementwise_affine=cfg.norm_elementwise_affine, norm_eps=cfg.norm_eps,
                sinusoidal_positions=cfg.max_num_positional_embeddings if cfg.positional_embeddings else 0,
            ))
        self.transformer_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, cfg.output_dim)

    def conditioning(self, temb: torch.Tensor) -> tuple[list, tuple[torch.Tensor, torch.Tensor]]:
        """Everything the timestep embedding decides: each block's AdaLN (scale, shift) and the output stage's."""
        blocks = [block.norm1.modulation(temb) for block in self.transformer_blocks]
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=-1)  # (shift, scale): the other order
        return blocks, (shift.unsqueeze(1), scale.unsqueeze(1))

    def forward(self, x: torch.Tensor, conditioning: tuple[list, tuple[torch.Tensor, torch.Tensor]],
                cross_kv: list, cross_masks: list) -> torch.Tensor:
        blocks, (shift, scale) = conditioning
        for block, modulation, kv, mask in zip(self.transformer_blocks, blocks, cross_kv, cross_masks):
            x = block(x, modulation, kv, mask)
        return self.proj_out_2(self.norm_out(x) * (1 + scale) + shift)


# ----------------------------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------------------------


class HeadConfig(Protocol):
    """What the head reads from a generation's config (Gr00tN1d6Config, and N1.7's)."""

    backbone_embedding_dim: int
    max_state_dim: int
    state_input_dim: int  # the state encoder's input width (N1.7 flattens its state history into one token)
    max_action_dim: int
    action_horizon: int
    hidden_size: int
    input_embedding_dim: int
    add_pos_embed: bool
    use_vlln: bool
    max_seq_len: int
    use_alternate_vl_dit: bool
    attend_text_every_n_blocks: int
    num_inference_timesteps: int
    num_timestep_buckets: int
    max_num_embodiments: int
    dit: DiTConfig


class FlowMatchingActionHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        k, d = config.max_num_embodiments, config.input_embedding_dim
        self.model = DiT(config.dit, cross_attention_dim=config.backbone_embedding_dim)
        self.state_encoder = CategorySpecificMLP(k, config.state_input_dim, config.hidden_size, d)
        self.action_encoder = MultiEmbodimentActionEncoder(config.max_action_dim, d, k)
        self.action_decoder = CategorySpecificMLP(k, config.hidden_size, config.hidden_size, config.max_action_dim)
        self.vlln = nn.LayerNorm(config.backbone_embedding_dim) if config.use_vlln else nn.Identity()
        if config.add_pos_embed:
            self.position_embedding = nn.Embedding(config.max_seq_len, d)

    # -- step-independent work ------------------------------------------------------------------------------------
    def step_constants(self, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, Any]]:
        """Per Euler step: (the action encoder's time code (1, width), the DiT's conditioning on the timestep).

        They depend on the step and the weights alone: computed once per (dtype, device) and kept
        (``clear_step_cache`` after changing weights). Plain tensors, not inference tensors, so compiled graphs
        may use them.
        """
        key = (dtype, device)
        cache = self.__dict__.setdefault("_step_cache", {})
        if key not in cache:
            cfg = self.config
            n = cfg.num_inference_timesteps
            with torch.inference_mode(False), torch.no_grad():
                steps = []
                for k in range(n):
                    bucket = torch.tensor([float(int(k / float(n) * cfg.num_timestep_buckets))], device=device)
                    temb = self.model.timestep_encoder(bucket, dtype)
                    steps.append((action_time_encoding(bucket, cfg.input_embedding_dim), self.model.conditioning(temb)))
            cache[key] = steps
        return cache[key]

    def clear_step_cache(self) -> None:
        self.__dict__.pop("_step_cache", None)

    def cross_attention_masks(self, valid: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor | None]:
        """Per DiT block: the (B, 1, 1, S) bool mask of the VL tokens its cross-attention sees, None for self-attention."""
        cfg = self.config
        text_mask = (valid & ~image)[:, None, None, :]
        image_mask = (valid & image)[:, None, None, :]
        all_mask = valid[:, None, None, :]
        masks: list[torch.Tensor | None] = []
        for i, block in enumerate(self.model.transformer_blocks):
            if not block.is_cross:
                masks.append(None)
            elif not cfg.use_alternate_vl_dit:
                masks.append(all_mask)
            else:
                masks.append(text_mask if i % (2 * cfg.attend_text_every_n_blocks) == 0 else image_mask)
        return masks

    def encode_context(self, vl_embeds: torch.Tensor) -> list:
        """Keys and values of the (vlln-normalised) VL features for every cross-attention block."""
        return [b.attn1.kv(vl_embeds) if b.is_cross else None for b in self.model.transformer_blocks]

    # -- one velocity evaluation ----------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, step: tuple[torch.Tensor, Any], state_tokens: torch.Tensor,
                 embodiment: int | torch.Tensor, cross_kv: list, cross_masks: list) -> torch.Tensor:
        tau, conditioning = step
        h = x.shape[1]
        a = self.action_encoder(x, tau, embodiment)
        if self.config.add_pos_embed:
            a = a + self.position_embedding.weight[:h].unsqueeze(0)
        tokens = torch.cat([state_tokens, a], dim=1)
        out = self.model(tokens, conditioning, cross_kv, cross_masks)
        return self.action_decoder(out, embodiment)[:, -h:]

    def sample(self, vl_embeds: torch.Tensor, valid: torch.Tensor, image: torch.Tensor, state: torch.Tensor,
               embodiment: int | torch.Tensor, noise: torch.Tensor, trace: dict[str, Any] | None = None,
               update_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Euler integration from ``noise`` (float32, (B, action_horizon, max_action_dim)) to the normalised
        actions (float32, same shape). ``vl_embeds``: the VL features after ``vlln`` (and N1.7's VL
        self-attention); ``valid`` / ``image``: (B, S) bool masks; ``state``: (B, T_s, state_input_dim).
        ``update_weights``: (B, action_horizon, 1) factors of each row's updates (real-time chunking: 0 keeps a
        row as ``noise`` holds it, see policy.rtc); None is 1 everywhere.
        ``trace``: when given, filled with every step's tensors (for the parity tests)."""
        dtype, device = vl_embeds.dtype, vl_embeds.device
        state_tokens = self.state_encoder(state.to(dtype), embodiment)
        cross_kv = self.encode_context(vl_embeds)
        masks = self.cross_attention_masks(valid, image)
        x = noise.to(device=device, dtype=torch.float32)
        dt = 1.0 / self.config.num_inference_timesteps
        if trace is not None:
            trace["state_features"] = state_tokens
        for k, step in enumerate(self.step_constants(dtype, device)):
            v = self.velocity(x.to(dtype), step, state_tokens, embodiment, cross_kv, masks).float()
            if trace is not None:
                trace[f"step{k}.actions_in"] = x
                trace[f"step{k}.velocity"] = v
            x = x + dt * (v if update_weights is None else v * update_weights)
        return x


__all__ = [
    "Attention",
    "BasicTransformerBlock",
    "CategorySpecificLinear",
    "CategorySpecificMLP",
    "DiT",
    "FeedForward",
    "FlowMatchingActionHead",
    "MultiEmbodimentActionEncoder",
]
