"""Native fleetserve policy model in the GR00T N1.6 shape, as a transformers ``PreTrainedModel``.

Structure (names are the state-dict prefixes):

* ``vision_model`` -- ``transformers.SiglipVisionModel`` (no pooling head); its patch features are
  pixel-shuffled (space-to-depth, ``pixel_shuffle_factor``) and projected to the LLM width by ``mlp1``
  (LayerNorm -> Linear -> GELU -> Linear, as Eagle's ``mlp1``).
* ``language_model`` -- ``transformers.Qwen3Model`` with only the first ``select_layer`` decoder layers (upper
  layers cut, as GR00T does) followed by its final RMSNorm. Input sequence per sample:
  ``[image tokens of all V views, text tokens]``, causal attention, right-padded text masked out.
* ``backbone_proj`` -- Linear to ``backbone_embedding_dim``. Backbone output: features (N, S, E) and a boolean
  key-padding mask (N, S) (True = real token).
* ``action_head`` -- GR00T's flow-matching DiT action head: ``vlln`` LayerNorm on the backbone features,
  per-embodiment ``state_encoder`` (CategorySpecificMLP), per-embodiment ``action_encoder`` (noisy action +
  sinusoidal encoding of the discretised timestep), learned ``position_embedding`` over the horizon, a DiT over
  ``[state tokens, action tokens]`` (AdaLN conditioned on the timestep embedding; cross-attention to the
  backbone features with the key-padding mask, self-attention over the state/action tokens -- interleaved as in
  GR00T by default), and a per-embodiment ``action_decoder``.

Inference (``get_action``): the backbone runs ONCE per call, and so do the state encoder, the ``vlln`` and the
cross-attention K/V projections of every cross-attention block; only the action encoder + DiT + action decoder
run ``num_inference_timesteps`` times (Euler steps from t=0 (noise) to t=1 (actions), x <- x + dt * v(x, t),
t discretised to ``int(t * num_timestep_buckets)`` for the embeddings, as GR00T).

Each sample's output depends only on that sample's inputs (no batch statistics, padding masked everywhere), so
a request computed alone or in a batch gives the same result up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel, Qwen3Model, SiglipVisionModel

try:  # transformers 5: these init functions leave tensors loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4.x (GR00T N1.6 pins 4.53): only modules with missing weights are initialised
    from torch.nn import init

from .configuration import MODEL_TYPE, FleetGr00tConfig

# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 1.0):
    """diffusers-style sinusoidal timestep embedding of ``t`` (any shape) -> (*t.shape, dim), float32."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float().unsqueeze(-1) * torch.exp(exponent)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Space-to-depth on a square patch grid: (B, g*g, C) -> (B, (g/f)^2, C*f^2)."""
    if factor == 1:
        return x
    b, p, c = x.shape
    g = int(round(math.sqrt(p)))
    h = g // factor
    x = x.reshape(b, h, factor, h, factor, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * h, factor * factor * c)


EmbodimentIds = "int | torch.Tensor"


class CategorySpecificLinear(nn.Module):
    """A linear layer with one weight matrix per category (embodiment): weight (K, in, out), bias (K, out).

    ``cat_ids`` is either an ``int`` -- the whole batch is one embodiment, as in every replica: a plain matmul
    with that category's weights (a view, nothing copied) -- or a (N,) tensor of per-sample ids, which gathers a
    weight matrix per sample (GR00T's general form; N times the weight traffic, kept for mixed batches).
    """

    def __init__(self, num_categories: int, in_features: int, out_features: int):
        super().__init__()
        self.num_categories = num_categories
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_categories, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_categories, out_features))

    def forward(self, x: torch.Tensor, cat_ids) -> torch.Tensor:
        # x: (N, T, in) -> (N, T, out); each sample uses only its own category's weights.
        if isinstance(cat_ids, int):
            return torch.matmul(x, self.weight[cat_ids]) + self.bias[cat_ids]
        return torch.baddbmm(self.bias[cat_ids].unsqueeze(1), x, self.weight[cat_ids])

    def extra_repr(self) -> str:
        return f"num_categories={self.num_categories}, in={self.in_features}, out={self.out_features}"


class CategorySpecificMLP(nn.Module):
    """GR00T's per-embodiment 2-layer MLP (ReLU)."""

    def __init__(self, num_categories: int, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.layer1 = CategorySpecificLinear(num_categories, in_features, hidden)
        self.layer2 = CategorySpecificLinear(num_categories, hidden, out_features)

    def forward(self, x, cat_ids):
        return self.layer2(F.relu(self.layer1(x, cat_ids)), cat_ids)


class MultiEmbodimentActionEncoder(nn.Module):
    """GR00T's action encoder: W3(swish(W2([W1(a), sincos(t)]))), all per embodiment."""

    def __init__(self, num_categories: int, action_dim: int, width: int):
        super().__init__()
        self.width = width
        self.W1 = CategorySpecificLinear(num_categories, action_dim, width)
        self.W2 = CategorySpecificLinear(num_categories, 2 * width, width)
        self.W3 = CategorySpecificLinear(num_categories, width, width)

    def tau(self, t_bucket: torch.Tensor) -> torch.Tensor:
        """Sinusoidal encoding of the discretised timestep(s): (..., width) float32."""
        return sinusoidal_embedding(t_bucket, self.width, flip_sin_to_cos=False, freq_shift=0.0)

    def forward(self, actions: torch.Tensor, tau: torch.Tensor, cat_ids) -> torch.Tensor:
        # actions (N, H, A); tau: (N or 1, width) encoding of the step's timestep (constant per step: precomputed)
        n, h, _ = actions.shape
        a = self.W1(actions, cat_ids)
        tau = tau.to(a.dtype).unsqueeze(1).expand(n, h, self.width)
        x = F.silu(self.W2(torch.cat([a, tau], dim=-1), cat_ids))
        return self.W3(x, cat_ids)


class TimestepEncoder(nn.Module):
    """Sinusoidal(channels) -> Linear -> SiLU -> Linear (diffusers ``TimestepEmbedding``)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_bucket: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = sinusoidal_embedding(t_bucket, self.channels).to(dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class AdaLayerNorm(nn.Module):
    """LayerNorm (no affine) modulated by the timestep embedding: norm(x) * (1 + scale) + shift."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(temb_act).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class DiTAttention(nn.Module):
    """Multi-head attention with SDPA; ``kv_dim`` set for cross-attention (K/V can be precomputed)."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        kv_dim = dim if kv_dim is None else kv_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        return x.view(n, s, self.heads, self.head_dim).transpose(1, 2)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self.to_k(context)), self._split(self.to_v(context))

    def forward(self, x, kv: tuple[torch.Tensor, torch.Tensor] | None = None, attn_mask=None):
        q = self._split(self.to_q(x))
        k, v = self.kv(x) if kv is None else kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        n, _, s, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(n, s, self.heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, mult * dim)
        self.fc2 = nn.Linear(mult * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """[AdaLN -> self-attention] and/or [AdaLN -> cross-attention to the backbone], then LayerNorm -> MLP."""

    def __init__(self, config: FleetGr00tConfig, has_self_attn: bool, has_cross_attn: bool):
        super().__init__()
        d, h, hd, eps = config.dit_inner_dim, config.num_attention_heads, config.attention_head_dim, config.norm_eps
        self.has_self_attn = has_self_attn
        self.has_cross_attn = has_cross_attn
        if has_self_attn:
            self.norm_self = AdaLayerNorm(d, eps)
            self.self_attn = DiTAttention(d, h, hd)
        if has_cross_attn:
            self.norm_cross = AdaLayerNorm(d, eps)
            self.cross_attn = DiTAttention(d, h, hd, kv_dim=config.backbone_embedding_dim)
        self.norm_ff = nn.LayerNorm(d, eps=eps)
        self.ff = FeedForward(d, config.mlp_ratio)

    def forward(self, x, temb_act, cross_kv=None, cross_mask=None):
        if self.has_self_attn:
            x = x + self.self_attn(self.norm_self(x, temb_act))
        if self.has_cross_attn:
            x = x + self.cross_attn(self.norm_cross(x, temb_act), kv=cross_kv, attn_mask=cross_mask)
        return x + self.ff(self.norm_ff(x))


class FlowMatchingDiT(nn.Module):
    def __init__(self, config: FleetGr00tConfig):
        super().__init__()
        d = config.dit_inner_dim
        self.timestep_encoder = TimestepEncoder(config.timestep_embedding_channels, d)
        blocks = []
        for i in range(config.num_layers):
            if config.interleave_self_attention:
                cross = i % 2 == 0
                blocks.append(DiTBlock(config, has_self_attn=not cross, has_cross_attn=cross))
            else:
                blocks.append(DiTBlock(config, has_self_attn=True, has_cross_attn=True))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.LayerNorm(d, eps=config.norm_eps, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(d, 2 * d)
        self.proj_out_2 = nn.Linear(d, config.hidden_size)

    def cross_kv(self, context: torch.Tensor) -> list:
        return [blk.cross_attn.kv(context) if blk.has_cross_attn else None for blk in self.blocks]

    def forward(self, x, temb, cross_kv: list, cross_mask):
        temb_act = F.silu(temb)
        for blk, kv in zip(self.blocks, cross_kv):
            x = blk(x, temb_act, kv, cross_mask)
        shift, scale = self.proj_out_1(temb_act).unsqueeze(1).chunk(2, dim=-1)
        x = self.norm_out(x) * (1 + scale) + shift
        return self.proj_out_2(x)


class FlowMatchingActionHead(nn.Module):
    def __init__(self, config: FleetGr00tConfig):
        super().__init__()
        d, k = config.dit_inner_dim, config.max_num_embodiments
        self.action_horizon = config.action_horizon
        self.num_timestep_buckets = config.num_timestep_buckets
        self.vlln = nn.LayerNorm(config.backbone_embedding_dim, eps=config.norm_eps)
        self.state_encoder = CategorySpecificMLP(k, config.max_state_dim, config.hidden_size, d)
        self.action_encoder = MultiEmbodimentActionEncoder(k, config.max_action_dim, d)
        self.position_embedding = nn.Embedding(config.action_horizon, d)
        self.model = FlowMatchingDiT(config)
        self.action_decoder = CategorySpecificMLP(k, config.hidden_size, config.hidden_size, config.max_action_dim)

    def step_embeddings(self, num_steps: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per Euler step: (action-encoder timestep encoding (1, d) float32, timestep embedding (1, d) ``dtype``).

        They depend only on the step and the weights, so inference computes them once and reuses them; cached
        per (num_steps, dtype, device) -- call :meth:`clear_step_cache` after changing the weights.
        """
        device = self.position_embedding.weight.device
        key = (int(num_steps), dtype, device)
        cache = self.__dict__.setdefault("_step_cache", {})
        if key not in cache:
            # plain tensors (not inference tensors), so a compiled or traced forward can use them too
            with torch.inference_mode(False), torch.no_grad():
                steps = []
                for step in range(num_steps):
                    t_bucket = torch.tensor([float(int(step / float(num_steps) * self.num_timestep_buckets))],
                                            device=device)
                    tau = self.action_encoder.tau(t_bucket)
                    temb = self.model.timestep_encoder(t_bucket, dtype)
                    steps.append((tau, temb))
            cache[key] = steps
        return cache[key]

    def clear_step_cache(self) -> None:
        self.__dict__.pop("_step_cache", None)

    def prepare(self, backbone_features, backbone_mask, state, embodiment_id):
        """Step-independent part: cross-attention K/V of every cross block, its mask, state tokens."""
        ctx = self.vlln(backbone_features)
        cross_kv = self.model.cross_kv(ctx)
        cross_mask = backbone_mask[:, None, None, :]  # (N, 1, 1, S) bool, True = attend
        state_tokens = self.state_encoder(state, embodiment_id)
        return cross_kv, cross_mask, state_tokens

    def velocity(self, x_t, tau, temb, embodiment_id, cross_kv, cross_mask, state_tokens):
        h = x_t.shape[1]
        a = self.action_encoder(x_t, tau, embodiment_id)
        a = a + self.position_embedding.weight[:h].unsqueeze(0)
        tokens = torch.cat([state_tokens, a], dim=1)
        out = self.model(tokens, temb, cross_kv, cross_mask)
        return self.action_decoder(out[:, -h:], embodiment_id)

    def sample(self, backbone_features, backbone_mask, state, embodiment_id, noise, num_steps: int):
        """Euler integration from ``noise`` (t=0) to actions (t=1). The state x, the step and the returned actions
        are float32 whatever the model dtype: the network sees x in its dtype, but rounding x itself to bf16
        would throw away the small per-step updates (and give a seed different noise per dtype)."""
        dtype = backbone_features.dtype
        cross_kv, cross_mask, state_tokens = self.prepare(backbone_features, backbone_mask, state, embodiment_id)
        x = noise.float()
        dt = 1.0 / num_steps
        for tau, temb in self.step_embeddings(num_steps, dtype):
            v = self.velocity(x.to(dtype), tau, temb, embodiment_id, cross_kv, cross_mask, state_tokens)
            x = x + dt * v.float()
        return x


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class FleetGr00tPreTrainedModel(PreTrainedModel):
    config_class = FleetGr00tConfig
    config: FleetGr00tConfig
    base_model_prefix = "fleet_gr00t"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SiglipEncoderLayer", "Qwen3DecoderLayer", "DiTBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # Linear / Embedding / LayerNorm: normal(0, initializer_range) / zeros / ones (transformers default).
        super()._init_weights(module)
        if isinstance(module, CategorySpecificLinear):
            # Per-embodiment layers: variance-preserving normal(0, 1/sqrt(fan_in)) (GR00T uses 0.02, which makes a
            # random-weight policy output little more than its input noise at small widths).
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
            init.zeros_(module.bias)


class FleetGr00tModel(FleetGr00tPreTrainedModel):
    """GR00T N1.6-shaped vision-language-action policy. Inference entry point: :meth:`get_action`."""

    def __init__(self, config: FleetGr00tConfig):
        super().__init__(config)
        self.vision_model = SiglipVisionModel(config.vision_config)
        vis_dim = config.vision_config.hidden_size * config.pixel_shuffle_factor**2
        llm_dim = config.llm_config.hidden_size
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vis_dim, eps=config.norm_eps),
            nn.Linear(vis_dim, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )
        self.language_model = Qwen3Model(config.llm_config_truncated())
        self.backbone_proj = nn.Linear(llm_dim, config.backbone_embedding_dim)
        self.action_head = FlowMatchingActionHead(config)
        self.post_init()

    # ---- backbone ------------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, V, 3, S, S) -> image tokens (N, V * num_image_tokens, llm hidden)."""
        n, v = pixel_values.shape[:2]
        llm_dim = self.config.llm_config.hidden_size
        if v == 0:
            return pixel_values.new_zeros(n, 0, llm_dim)
        feats = self.vision_model(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state
        feats = pixel_shuffle(feats, self.config.pixel_shuffle_factor)
        tokens = self.mlp1(feats)
        return tokens.reshape(n, v * tokens.shape[1], llm_dim)

    def encode_backbone(self, pixel_values, input_ids, attention_mask):
        """Backbone features (N, S, backbone_embedding_dim) and key-padding mask (N, S) bool (True = real)."""
        img = self.encode_images(pixel_values)
        txt = self.language_model.embed_tokens(input_ids)
        embeds = torch.cat([img, txt.to(img.dtype)], dim=1)
        n, s_img = img.shape[:2]
        mask = torch.cat(
            [torch.ones(n, s_img, dtype=torch.bool, device=embeds.device), attention_mask.to(torch.bool)], dim=1
        )
        position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
        hidden = self.language_model(
            inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids, use_cache=False
        ).last_hidden_state
        # padded positions are masked out of the cross-attention anyway; zero them so that nothing non-finite
        # there (e.g. a fully masked row with left padding) can leak through 0 * nan.
        feats = torch.where(mask.unsqueeze(-1), self.backbone_proj(hidden), 0.0)
        return feats, mask

    # ---- inference -------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, pixel_values, input_ids, attention_mask, state, embodiment_id, noise):
        cfg, dev, dt = self.config, self.device, self.dtype
        pixel_values = pixel_values.to(device=dev, dtype=dt)
        if pixel_values.dim() == 4:  # (N, 3, S, S): a single view
            pixel_values = pixel_values.unsqueeze(1)
        input_ids = input_ids.to(device=dev, dtype=torch.long)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device=dev)
        state = state.to(device=dev, dtype=dt)
        if state.dim() == 2:
            state = state.unsqueeze(1)
        if state.shape[-1] > cfg.max_state_dim:
            raise ValueError(f"state dim {state.shape[-1]} > max_state_dim {cfg.max_state_dim}")
        if state.shape[-1] < cfg.max_state_dim:
            state = F.pad(state, (0, cfg.max_state_dim - state.shape[-1]))
        n = input_ids.shape[0]
        embodiment_id = self._embodiment(embodiment_id, n)
        noise = noise.to(device=dev, dtype=torch.float32)
        expected = (n, cfg.action_horizon, cfg.max_action_dim)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise shape {tuple(noise.shape)} != {expected}")
        for name, t in (("pixel_values", pixel_values), ("state", state)):
            if t.shape[0] != n:
                raise ValueError(f"{name} batch {t.shape[0]} != input_ids batch {n}")
        return pixel_values, input_ids, attention_mask, state, embodiment_id, noise

    def _embodiment(self, embodiment_id, n: int):
        """An int when the whole batch is one embodiment (the per-embodiment layers then run as plain linears),
        else a (N,) long tensor on the model's device. Checked on the host: no device-to-host sync per call."""
        k = self.config.max_num_embodiments
        if isinstance(embodiment_id, torch.Tensor) and embodiment_id.device.type != "cpu":
            ids = embodiment_id.to(torch.long).reshape(-1)  # already on a device: trusted, kept as it is
            if ids.numel() != n:
                raise ValueError(f"embodiment_id batch {ids.numel()} != input_ids batch {n}")
            return ids
        if isinstance(embodiment_id, int) and not isinstance(embodiment_id, bool):
            if not 0 <= embodiment_id < k:
                raise ValueError(f"embodiment_id out of range [0, {k})")
            return embodiment_id
        ids = torch.as_tensor(embodiment_id, dtype=torch.long).reshape(-1)
        if ids.numel() == 1 and n != 1:
            ids = ids.expand(n)
        if ids.numel() != n:
            raise ValueError(f"embodiment_id batch {ids.numel()} != input_ids batch {n}")
        if n and (int(ids.min()) < 0 or int(ids.max()) >= k):
            raise ValueError(f"embodiment_id out of range [0, {k})")
        if n and bool((ids == ids[0]).all()):
            return int(ids[0])
        return ids.to(self.device)

    def forward(self, pixel_values, input_ids, attention_mask, state, embodiment_id, noise) -> torch.Tensor:
        """Same as :meth:`get_action` without the inference-mode guard."""
        pixel_values, input_ids, attention_mask, state, embodiment_id, noise = self._prepare_inputs(
            pixel_values, input_ids, attention_mask, state, embodiment_id, noise
        )
        feats, mask = self.encode_backbone(pixel_values, input_ids, attention_mask)
        return self.action_head.sample(
            feats, mask, state, embodiment_id, noise, num_steps=self.config.num_inference_timesteps
        )

    @torch.inference_mode()
    def get_action(self, pixel_values, input_ids, attention_mask, state, embodiment_id, noise) -> torch.Tensor:
        """Normalised actions (N, action_horizon, max_action_dim), float32 whatever the model dtype.

        pixel_values: float (N, V, 3, S, S) in [-1, 1], S = config.image_size, V views per sample (same for all).
        input_ids: long (N, L); attention_mask: (N, L), 1 = real token (right padding).
        state: float (N, T_s, max_state_dim), normalised, zero-padded.
        embodiment_id: an int (one embodiment for the batch: the fast path) or long (N,) (on the CPU it is
            checked, and collapsed to an int when all ids agree).
        noise: float (N, action_horizon, max_action_dim), the initial flow-matching noise (used in float32).
        """
        return self.forward(pixel_values, input_ids, attention_mask, state, embodiment_id, noise)


def _register() -> None:
    try:
        AutoConfig.register(MODEL_TYPE, FleetGr00tConfig)
    except ValueError:
        pass
    try:
        AutoModel.register(FleetGr00tConfig, FleetGr00tModel)
    except ValueError:
        pass


_register()

__all__ = ["FleetGr00tModel", "FleetGr00tPreTrainedModel", "FleetGr00tConfig"]
