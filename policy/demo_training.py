"""Smooth demo presets: a demo checkpoint whose action head is briefly trained, so its chunks move like a trained
policy's instead of random weights' per-step noise.

Why: the loop benchmark (bench.loop) measures the action step across a chunk switch against the steps inside
chunks. Random DiT weights give chunks that jump at every step, so the measure cannot tell a continued chunk
from a fresh one. ``tiny-smooth`` and ``small-smooth`` are ``tiny`` / ``small`` (same architecture, dimensions
and embodiment layouts, GR00T N1.6) whose head is fitted, offline and deterministically, to a synthetic task.

The task, in each state key's normalised units u = 2 (s - min) / (max - min) - 1 (the model's own input):
consecutive joints of a key form pairs (x, y); from the pair's angle theta and radius rho the chunk is an arc
of radius ``arc_radius`` continuing from the current state plus a pull towards the circle of radius
``cycle_radius``::

    d_k = R (e(theta + sweep (k+1)/H) - e(theta)) + (1 - pull^(k+1)) clip(rho0 - rho) e(theta),  e(a) = (cos a, sin a)

(per joint this is ``R (sin(sweep (k+1)/H + phi) - sin phi)`` with the phase phi read from the state, plus the
pull). A closed loop that keeps re-planning converges to circling at radius rho0, so robots keep moving. The arcs
are tighter than that circle, so a chunk planned a few steps later from the state the previous chunk reached
does not lie on the previous one: consecutive chunks agree roughly but not exactly, as a trained policy's do.
A key's odd last joint follows the first pair's phase. Actions without a min/max state (e.g. unitree_g1's
base_height_command) stay at their statistics' middle.

Targets are physical actions turned into the model's normalised space by the checkpoint's own codec
(:class:`policy.state_action.StateActionCodec`): relative keys relative to the state, and ``relative_action``
statistics written from the task's bounds (:func:`smooth_relative_statistics`), so nothing is clipped.

Training is GR00T's flow matching, in the convention policy.flow_matching integrates: x_t = (1 - t) noise +
t action, target velocity action - noise, t discretised to int(t * num_timestep_buckets); t = (s_max - s) /
s_max with s ~ Beta(1.5, 1) (drawn as U^(1/1.5), so a torch.Generator makes it reproducible). Only the head
learns (DiT, state and action encoders, action decoder, positions); the backbone stays random and frozen: its
features for a handful of random images and prompts are computed once and reused.

Deterministic: every draw comes from seeded generators, the thread count is fixed while training, so two
builds write the same bytes. The recipe (and its fingerprint) is recorded in config.json's ``fleet_demo``:
a cached checkpoint built by another recipe is rebuilt (policy.make_demo_checkpoint.ensure_demo_checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from typing import Any, Mapping

import numpy as np

SUFFIX = "-smooth"
BETA_ALPHA = 1.5  # GR00T's time distribution: s ~ Beta(1.5, 1), t = (s_max - s) / s_max
NOISE_S = 0.999
TASKS = ("pick the pear from the counter and place it in the plate", "open the drawer",
         "put the cup on the shelf", "wipe the table with the towel")


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: int  # Adam steps
    batch: int
    lr: float
    contexts: int = 8  # random image / prompt sets per embodiment whose backbone features are cached
    arc_radius: float = 0.25  # R: radius of a chunk's arc, normalised state units
    cycle_radius: float = 0.5  # rho0: the circle the closed loop settles on
    sweep: float = math.pi / 2  # the angle a whole chunk's arc sweeps
    pull: float = 0.7  # per-step decay of the pull towards rho0 (1 - pull^(k+1) of it is applied at step k)
    max_pull: float = 0.25  # |rho0 - rho| the pull corrects at most (bounds the relative statistics)
    threads: int = 1  # torch threads while training: at 2, two builds differed (Adam amplifies the last bit of a
    # threaded reduction on near-zero gradients into a whole step)
    seed_offset: int = 1_000_003  # training draws use seed + this: not the weights' own stream
    version: int = 1  # bump when the code's meaning of a recipe changes

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


# Chunks sweep half a turn of a 0.4-radius arc (a step of ~0.08 normalised units): motion large enough that a
# briefly trained head's residual error stays well below it. tiny-smooth's head is 128 wide (tiny's 32 cannot
# carry 29 action dims of noise through: its loss stalled near 1); measured on 2 cores: loss 1.5 -> 0.08 in
# 1500 steps, the chunk's p95 step within 10% of the task's own (make_demo_checkpoint gives both smooth presets
# that head).
RECIPES: dict[str, Recipe] = {
    "tiny-smooth": Recipe(steps=1000, batch=32, lr=3e-3, arc_radius=0.4, sweep=math.pi),
    "small-smooth": Recipe(steps=1000, batch=32, lr=3e-3, contexts=4, arc_radius=0.4, sweep=math.pi),
}
SMOOTH_PRESETS = tuple(RECIPES)


def base_preset(preset: str) -> str:
    """The random preset a smooth one trains: its architecture, dimensions and layouts."""
    return preset[: -len(SUFFIX)] if preset in RECIPES else preset


def recipe_for(preset: str) -> Recipe | None:
    return RECIPES.get(preset)


# ----------------------------------------------------------------------------------------------------------------
# The synthetic task
# ----------------------------------------------------------------------------------------------------------------


def chunk_offsets(u: np.ndarray, recipe: Recipe, horizon: int) -> np.ndarray:
    """(N, D) normalised states of one key -> (N, horizon, D) offsets d_k of the chunk from the state."""
    u = np.asarray(u, dtype=np.float64)
    n, d = u.shape
    out = np.zeros((n, horizon, d))
    k = np.arange(1, horizon + 1, dtype=np.float64)
    angle = recipe.sweep * k / horizon  # (H,)
    ramp = 1.0 - recipe.pull**k  # (H,)
    first_theta = None
    for j in range(0, d - 1, 2):
        x, y = u[:, j], u[:, j + 1]
        theta = np.arctan2(y, x)[:, None]
        pull = np.clip(recipe.cycle_radius - np.hypot(x, y), -recipe.max_pull, recipe.max_pull)[:, None]
        r = recipe.arc_radius
        out[:, :, j] = r * (np.cos(theta + angle) - np.cos(theta)) + ramp * pull * np.cos(theta)
        out[:, :, j + 1] = r * (np.sin(theta + angle) - np.sin(theta)) + ramp * pull * np.sin(theta)
        first_theta = theta if first_theta is None else first_theta
    if d % 2 == 1 and first_theta is not None:
        out[:, :, d - 1] = recipe.arc_radius * (np.sin(first_theta + angle) - np.sin(first_theta))
    return out


def offset_bounds(recipe: Recipe, horizon: int) -> np.ndarray:
    """(horizon,) bound of |d_k| on any joint, whatever the state: |e(a) - e(b)| <= 2 sin(|a - b| / 2)."""
    k = np.arange(1, horizon + 1, dtype=np.float64)
    arc = 2.0 * recipe.arc_radius * np.sin(np.minimum(recipe.sweep * k / horizon, math.pi) / 2.0)
    return arc + (1.0 - recipe.pull**k) * recipe.max_pull


def _minmax_states(spec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{state key: (min, max)} of the keys the model sees min/max normalised (what the task is written in)."""
    mc = spec.modality_configs["state"]
    special = set(mc.sin_cos_embedding_keys or ()) | set(mc.mean_std_embedding_keys or ())
    return {k: (np.asarray(spec.statistics["state"][k]["min"], np.float64),
                np.asarray(spec.statistics["state"][k]["max"], np.float64))
            for k in mc.modality_keys if k not in special}


def smooth_relative_statistics(tag: str, layout: dict[str, Any], statistics: dict[str, Any], recipe: Recipe,
                               horizon: int) -> dict[str, Any]:
    """``statistics`` with each RELATIVE action key's per-step statistics replaced by the task's bounds (2% over
    them, so the codec never clips a target), in physical units of the key's state."""
    from clients.modality import ActionRepresentation

    out = json.loads(json.dumps(statistics))
    bound = offset_bounds(recipe, horizon) * 1.02
    acfgs = layout["modality_configs"]["action"].action_configs or []
    for key, ac in zip(layout["action_dims"], acfgs):
        if ac.rep != ActionRepresentation.RELATIVE:
            continue
        st = statistics["state"][ac.state_key or key]
        half_span = (np.asarray(st["max"]) - np.asarray(st["min"])) / 2.0
        b = bound[:, None] * half_span[None, :]
        out.setdefault("relative_action", {})[key] = {
            name: np.round(v, 6).tolist() for name, v in
            (("min", -b), ("max", b), ("mean", np.zeros_like(b)), ("std", b / 2.0), ("q01", -0.98 * b), ("q99", 0.98 * b))
        }
    return out


class Task:
    """One embodiment's synthetic task: states drawn over the normalised box, their target chunks, normalised."""

    def __init__(self, spec, codec, recipe: Recipe):
        self.spec, self.codec, self.recipe = spec, codec, recipe
        self.horizon = codec.action_horizon
        self.minmax = _minmax_states(spec)
        self.relative_keys = {key for key, _, _ in codec.relative_actions}

    def sample_states(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Raw states {key: (n, 1, D)}: min/max keys uniform over the box a little past [-1, 1] (robots start
        outside it and the codec clips), the others uniform between their min and max."""
        out = {}
        for key in self.spec.state_keys:
            st = self.spec.statistics["state"][key]
            lo, hi = np.asarray(st["min"], np.float64), np.asarray(st["max"], np.float64)
            u = rng.uniform(-1.1, 1.1, size=(n, lo.shape[0]))
            out[key] = (lo + (u + 1.0) / 2.0 * (hi - lo))[:, None, :].astype(np.float32)
        return out

    def physical_chunk(self, states: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw states {key: (N, T, D)} -> the target chunk {action key: (N, horizon, D)}, physical."""
        ac_list = self.spec.modality_configs["action"].action_configs or [None] * len(self.codec.action_keys)
        mean_std = set(self.spec.modality_configs["action"].mean_std_embedding_keys or ())
        out = {}
        for key, ac in zip(self.codec.action_keys, ac_list):
            d = self.spec.action_dims[key]
            state_key = ac.state_key if ac is not None and ac.state_key else key
            n = next(iter(states.values())).shape[0]
            if state_key in self.minmax and self.spec.state_dims.get(state_key) == d:
                lo, hi = self.minmax[state_key]
                s = np.asarray(states[state_key], np.float64)[:, -1]
                u = np.clip(2.0 * (s - lo) / (hi - lo) - 1.0, -1.0, 1.0)
                offsets = chunk_offsets(u, self.recipe, self.horizon)
                if key in self.relative_keys:
                    out[key] = s[:, None, :] + offsets * ((hi - lo) / 2.0)
                else:  # absolute: the same path, from the (clipped) state it reads
                    out[key] = lo + (u[:, None, :] + offsets + 1.0) / 2.0 * (hi - lo)
            else:
                st = self.spec.statistics["action"][key]
                mid = (np.asarray(st["mean"]) if key in mean_std
                       else (np.asarray(st["min"]) + np.asarray(st["max"])) / 2.0)
                out[key] = np.broadcast_to(mid, (n, self.horizon, d)).copy()
        return {k: v.astype(np.float32) for k, v in out.items()}

    def normalised_chunk(self, states: Mapping[str, np.ndarray]) -> np.ndarray:
        """(N, horizon, action_dim) model-space targets."""
        return self.codec.normalize_actions(self.physical_chunk(states), states)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def _contexts(model, processor, spec, count: int, rng: np.random.Generator):
    """Backbone features (after vlln) of ``count`` random observations: [(vl (1, S, D), valid (1, S), image (1, S))]."""
    import torch

    out = []
    mc = spec.modality_configs
    frames = len(mc["video"].delta_indices)
    for i in range(count):
        obs = {
            "video": {cam: rng.integers(0, 256, size=(1, frames, 96, 96, 3), dtype=np.uint8)
                      for cam in mc["video"].modality_keys},
            "language": {mc["language"].modality_keys[0]: [TASKS[i % len(TASKS)]]},  # the validated form
        }
        states = {k: np.zeros((1, 1, d), np.float32) for k, d in spec.state_dims.items()}
        inputs = processor.collate([obs], states, device=torch.device("cpu"), dtype=torch.float32)
        valid = inputs["attention_mask"].bool()
        image = inputs["input_ids"] == model.backbone_config.image_token_index
        with torch.no_grad():
            feats = model.backbone.model(inputs["images"], inputs["input_ids"], valid)
            feats = torch.where(valid.unsqueeze(-1), feats, 0.0)
            out.append((model.action_head.vlln(feats), valid, image))
    return out


def _left_pad(items):
    """Stack (1, S_i, ...) tensors, left-padded to the longest (as the processor pads prompts)."""
    import torch

    s = max(t.shape[1] for t in items)
    rows = []
    for t in items:
        pad = torch.zeros((1, s - t.shape[1], *t.shape[2:]), dtype=t.dtype)
        rows.append(torch.cat([pad, t], dim=1))
    return torch.cat(rows)


def _zero_residual_branches(head) -> None:
    """Start every DiT block as the identity (its attention and feed-forward outputs zero, as DiTs start
    training, "adaLN-Zero") and the decoder's output at zero: the action tokens then reach the decoder untouched,
    so the velocity's dependence on x_t is learnt in a few hundred steps instead of fought through random
    blocks and random cross-attention to random backbone features."""
    import torch

    with torch.no_grad():
        for block in head.model.transformer_blocks:
            for layer in (block.attn1.to_out[0], block.ff.net[2]):
                layer.weight.zero_()
                layer.bias.zero_()
        head.action_decoder.layer2.W.zero_()
        head.action_decoder.layer2.b.zero_()


def train_head(model, processors: Mapping[str, Any], recipe: Recipe, seed: int, log=None) -> dict[str, Any]:
    """Fit ``model``'s action head (in place, float32 on the CPU) to the task of every embodiment in
    ``processors`` ({tag: Gr00tN1d6Processor}). Returns a summary (steps, final loss, seconds)."""
    import torch

    from .flow_matching import action_time_encoding

    t0 = time.perf_counter()
    head = model.action_head
    cfg = head.config
    trainable = [p for name, p in head.named_parameters() if not name.startswith("vlln.")]
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    # eval mode: the DiT's dropout would draw from the global RNG (two builds would differ); a fit of a few
    # hundred steps to a deterministic task needs no regularisation
    model.eval()
    try:
        rng = np.random.default_rng([int(seed), recipe.seed_offset])
        gen = torch.Generator().manual_seed(int(seed) + recipe.seed_offset)
        tags = list(processors)
        tasks = [Task(processors[t].spec, processors[t].codec, recipe) for t in tags]
        ctx = [c for t in tags for c in _contexts(model, processors[t], processors[t].spec, recipe.contexts, rng)]
        vl, valid, image = (_left_pad([c[i] for c in ctx]) for i in range(3))
        ctx_task = torch.tensor([i for i in range(len(tags)) for _ in range(recipe.contexts)])
        emb_ids = torch.tensor([int(processors[t].spec.embodiment_id) for t in tags])
        horizon, width = cfg.action_horizon, cfg.max_action_dim
        _zero_residual_branches(head)
        for p in trainable:
            p.requires_grad_(True)
        opt = torch.optim.Adam(trainable, lr=recipe.lr)
        # a short warm-up (Adam's first steps on random weights overshoot), then cosine decay to a tenth: the
        # last steps settle instead of jittering around the optimum
        warm = max(1, recipe.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, recipe.steps) / recipe.steps))))
        losses = []
        for step in range(recipe.steps):
            pick = torch.randint(len(ctx), (recipe.batch,), generator=gen)
            task_of = ctx_task[pick]
            states = torch.zeros(recipe.batch, 1, cfg.max_state_dim)
            action = torch.zeros(recipe.batch, horizon, width)
            mask = torch.zeros(recipe.batch, horizon, width)
            for i, task in enumerate(tasks):
                rows = (task_of == i).nonzero().flatten()
                if len(rows) == 0:
                    continue
                raw = task.sample_states(rng, len(rows))
                states[rows] = torch.from_numpy(task.codec.encode_states(raw))
                y = torch.from_numpy(task.normalised_chunk(raw))
                action[rows, : y.shape[1], : y.shape[2]] = y
                mask[rows, : y.shape[1], : y.shape[2]] = 1.0  # padded dims and rows are never decoded
            noise = torch.randn(recipe.batch, horizon, width, generator=gen)
            s = torch.rand(recipe.batch, generator=gen) ** (1.0 / BETA_ALPHA)
            t = ((NOISE_S - s) / NOISE_S)[:, None, None]
            x_t = (1.0 - t) * noise + t * action
            bucket = (t.flatten() * cfg.num_timestep_buckets).long().float()
            tau = action_time_encoding(bucket, cfg.input_embedding_dim)
            conditioning = head.model.conditioning(head.model.timestep_encoder(bucket, torch.float32))
            emb = emb_ids[task_of]
            v = head.velocity(x_t, (tau, conditioning), head.state_encoder(states, emb), emb,
                              head.encode_context(vl[pick]), head.cross_attention_masks(valid[pick], image[pick]))
            loss = (((v - (action - noise)) ** 2) * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log is not None and (step + 1) % 100 == 0:
                log(f"  step {step + 1}/{recipe.steps}: loss {np.mean(losses[-100:]):.4f}")
    finally:
        for p in trainable:
            p.requires_grad_(False)
        torch.set_num_threads(threads)
        head.clear_step_cache()
    model.eval()
    return {"steps": recipe.steps, "final_loss": round(float(np.mean(losses[-20:])), 5),
            "seconds": round(time.perf_counter() - t0, 1)}


__all__ = ["RECIPES", "Recipe", "SMOOTH_PRESETS", "Task", "base_preset", "chunk_offsets", "offset_bounds",
           "recipe_for", "smooth_relative_statistics", "train_head"]
