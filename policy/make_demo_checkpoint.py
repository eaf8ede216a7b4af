"""Build a demo checkpoint (random weights, plausible statistics), offline and deterministically.

    python -m policy.make_demo_checkpoint OUT_DIR --preset {tiny,small,n16-3b} [--embodiments gr1,unitree_g1]
                                                  [--seed 0] [--force]

Same arguments -> same files, byte for byte (torch.manual_seed before the model is built; statistics from a
numpy generator seeded from the seed and the tag; the tokenizer from a fixed vocabulary). Nothing is downloaded.

Embodiment layouts:

- ``gr1`` (the N1.6 gr1 tutorial): camera ``ego_view_bg_crop_pad_res256_freq20`` (1 frame); states left_arm 7,
  right_arm 7, left_hand 6, right_hand 6, waist 3 (1 step); 16-step actions over the same keys (arms and waist
  RELATIVE to their state, hands ABSOLUTE); language ``annotation.human.task_description``.
- ``unitree_g1``: cameras ``ego_view`` and ``wrist_view``; states left_leg 6, right_leg 6 (mean/std normalised),
  waist 3, left_arm 7, right_arm 7, left_hand 7, right_hand 7; 16-step actions over arms (RELATIVE), hands,
  waist and base_height_command 1 (32 dims: the models' max_action_dim).
- any other tag: generic, camera ``front_view``, state ``joints`` 7, action ``joints`` 7 (ABSOLUTE).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from clients.modality import ActionConfig, ActionRepresentation, ActionType, ModalityConfig

from .checkpoint import (
    CheckpointError,
    embodiment_entry,
    read_checkpoint,
    save_tokenizer,
    write_embodiment_ids,
    write_processor_config,
    write_statistics,
)
from .embodiment import resolve_tag

DEFAULT_EMBODIMENTS = ("gr1", "unitree_g1")
_SEED_LOCK = threading.Lock()  # torch.manual_seed is process-global: one seeded model build at a time
PRESETS = ("tiny", "small", "n16-3b")
MAX_TEXT_LENGTH = 64
LANGUAGE_KEY = "annotation.human.task_description"
ACTION_HORIZON = 16

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
# Task words the demo vocabulary holds whole; anything else is spelt with characters (WordPiece "##" pieces).
TASK_WORDS = """
a an the this that these those it its to of in on onto into from with without and or then next after before
until while by at for up down left right top bottom front back side middle center near far above below under
over inside outside between behind beside around through across along
pick place put move push pull open close turn rotate lift lower grab grasp release drop hold hand give take bring
carry slide stack unstack pour fill empty wipe clean fold unfold insert remove press tap hang flip toss throw
catch wash cut sort arrange align reach point look walk go stop wait return start finish use set get make
cup mug plate bowl pear apple banana orange lemon can bottle box block cube ball toy book drawer door cabinet
fridge microwave oven sink faucet counter table shelf tray basket bin lid jar pot pan kettle spoon fork knife
cloth towel sponge tool handle button switch knob chair bag shoe phone laptop mouse keyboard cable wire paper
pen pencil marker tape scissors bread egg milk water coffee tea food fruit vegetable object item thing one two
three red green blue yellow black white gray brown pink purple small large big little tall short long round
square flat soft hard empty full other same first second last all each both robot gripper arm arms
""".split()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def demo_vocabulary(limit: int) -> list[str]:
    """Fixed vocabulary: special tokens, printable ASCII (lower-case, no space), "##" continuations of letters
    and digits, then task words while they fit in `limit`."""
    vocab: list[str] = list(SPECIAL_TOKENS)
    chars = [chr(c) for c in range(33, 127) if not ("A" <= chr(c) <= "Z")]
    vocab += chars
    vocab += ["##" + c for c in chars if c.isalnum()]
    if len(vocab) > limit:
        raise ValueError(f"tokenizer: the model's vocabulary of {limit} cannot hold the {len(vocab)} base tokens")
    seen = set(vocab)
    for w in TASK_WORDS:
        if len(vocab) >= limit:
            break
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    return vocab


def build_tokenizer(vocab_size_limit: int, max_length: int = MAX_TEXT_LENGTH):
    """A WordPiece tokenizer (lower-casing, [BOS] text [EOS]) as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(demo_vocabulary(vocab_size_limit))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        pair="[BOS] $A [EOS] $B:1 [EOS]:1",
        special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=max_length,
        padding_side="right",
    )


# ----------------------------------------------------------------------------------------------------------------
# Layouts and statistics
# ----------------------------------------------------------------------------------------------------------------


def _rel(key: str) -> ActionConfig:
    return ActionConfig(rep=ActionRepresentation.RELATIVE, type=ActionType.NON_EEF, state_key=key)


def _abs() -> ActionConfig:
    return ActionConfig(rep=ActionRepresentation.ABSOLUTE, type=ActionType.NON_EEF)


def embodiment_layout(tag: str) -> dict[str, Any]:
    """{"modality_configs": {...}, "state_dims": {...}, "action_dims": {...}} for a demo embodiment."""
    tag = resolve_tag(tag)
    horizon = list(range(ACTION_HORIZON))
    language = ModalityConfig(delta_indices=[0], modality_keys=[LANGUAGE_KEY])
    if tag == "gr1":
        state_dims = {"left_arm": 7, "right_arm": 7, "left_hand": 6, "right_hand": 6, "waist": 3}
        action_dims = dict(state_dims)
        acfg = {"left_arm": _rel("left_arm"), "right_arm": _rel("right_arm"), "left_hand": _abs(),
                "right_hand": _abs(), "waist": _rel("waist")}
        video = ModalityConfig(delta_indices=[0], modality_keys=["ego_view_bg_crop_pad_res256_freq20"])
        state = ModalityConfig(delta_indices=[0], modality_keys=list(state_dims))
        action_mean_std = None
    elif tag == "unitree_g1":
        state_dims = {"left_leg": 6, "right_leg": 6, "waist": 3, "left_arm": 7, "right_arm": 7, "left_hand": 7,
                      "right_hand": 7}
        action_dims = {"left_arm": 7, "right_arm": 7, "left_hand": 7, "right_hand": 7, "waist": 3,
                       "base_height_command": 1}
        acfg = {"left_arm": _rel("left_arm"), "right_arm": _rel("right_arm"), "left_hand": _abs(),
                "right_hand": _abs(), "waist": _abs(), "base_height_command": _abs()}
        video = ModalityConfig(delta_indices=[0], modality_keys=["ego_view", "wrist_view"])
        state = ModalityConfig(delta_indices=[0], modality_keys=list(state_dims),
                               mean_std_embedding_keys=["left_leg", "right_leg"])
        action_mean_std = ["base_height_command"]
    else:
        state_dims = {"joints": 7}
        action_dims = {"joints": 7}
        acfg = {"joints": _abs()}
        video = ModalityConfig(delta_indices=[0], modality_keys=["front_view"])
        state = ModalityConfig(delta_indices=[0], modality_keys=["joints"])
        action_mean_std = None
    action = ModalityConfig(
        delta_indices=horizon,
        modality_keys=list(action_dims),
        mean_std_embedding_keys=action_mean_std,
        action_configs=[acfg[k] for k in action_dims],
    )
    return {
        "modality_configs": {"video": video, "state": state, "action": action, "language": language},
        "state_dims": state_dims,
        "action_dims": action_dims,
    }


def _range_for(key: str, rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    if key.endswith("hand"):
        lo = rng.uniform(0.0, 0.1, d)
        hi = rng.uniform(1.2, 1.7, d)
    elif key.endswith("arm") or key == "joints":
        lo = rng.uniform(-3.1, -1.0, d)
        hi = rng.uniform(1.0, 3.1, d)
    elif key.endswith("leg"):
        lo = rng.uniform(-2.5, -0.8, d)
        hi = rng.uniform(0.8, 2.5, d)
    elif key == "base_height_command":
        lo = rng.uniform(0.55, 0.6, d)
        hi = rng.uniform(0.75, 0.8, d)
    else:  # waist and anything else
        lo = rng.uniform(-1.0, -0.3, d)
        hi = rng.uniform(0.3, 1.0, d)
    return lo, hi


def _stats(lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator) -> dict[str, list[float]]:
    span = hi - lo
    mean = (lo + hi) / 2 + rng.uniform(-0.1, 0.1, lo.shape) * span
    std = span / rng.uniform(4.0, 8.0, lo.shape)
    q01 = lo + rng.uniform(0.005, 0.03, lo.shape) * span
    q99 = hi - rng.uniform(0.005, 0.03, lo.shape) * span

    def r(a: np.ndarray) -> list[float]:
        return [round(float(v), 6) for v in a]

    return {"min": r(lo), "max": r(hi), "mean": r(mean), "std": r(std), "q01": r(q01), "q99": r(q99)}


def embodiment_statistics(tag: str, layout: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Deterministic plausible statistics: joint ranges in radians, hands 0..1.7, relative actions +-0.1..0.4."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(tag.encode())])
    state: dict[str, Any] = {}
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, d in layout["state_dims"].items():
        ranges[key] = _range_for(key, rng, d)
        state[key] = _stats(*ranges[key], rng)
    action: dict[str, Any] = {}
    relative: dict[str, Any] = {}
    acfgs = layout["modality_configs"]["action"].action_configs or []
    for (key, d), ac in zip(layout["action_dims"].items(), acfgs):
        lo, hi = ranges[key] if key in ranges else _range_for(key, rng, d)
        action[key] = _stats(lo, hi, rng)
        if ac.rep != ActionRepresentation.ABSOLUTE:
            relative[key] = _stats(-rng.uniform(0.1, 0.4, d), rng.uniform(0.1, 0.4, d), rng)
    out = {"state": state, "action": action}
    if relative:
        out["relative_action"] = relative
    return out


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


def _normalise_embodiments(embodiments: Iterable[str] | str) -> list[str]:
    if isinstance(embodiments, str):
        embodiments = [e for e in embodiments.split(",") if e.strip()]
    tags: list[str] = []
    for e in embodiments:
        t = resolve_tag(e)
        if t not in tags:
            tags.append(t)
    if not tags:
        raise ValueError("embodiments: expected at least one embodiment tag")
    return tags


def demo_dtype(preset: str):
    """The dtype a demo checkpoint stores: bf16 for the 3B model (halves the file), fp32 for tiny / small."""
    import torch

    return torch.bfloat16 if preset == "n16-3b" else torch.float32


def build_demo_model(preset: str, *, seed: int = 0, dtype=None, device=None, config=None):
    """A demo model with seeded random weights, created directly in ``dtype`` (default: :func:`demo_dtype`) on
    ``device`` (default: the CPU). Never a float32 copy first: that is 12 GB for n16-3b. The same (preset,
    seed, dtype, device) gives the same weights; the CPU build is what checkpoints store (device-independent)."""
    import torch

    from .configuration import FleetGr00tConfig
    from .modeling import FleetGr00tModel

    config = config if config is not None else FleetGr00tConfig.from_preset(preset)
    dtype = demo_dtype(preset) if dtype is None else dtype
    device = torch.device("cpu" if device is None else device)
    devices = [device.index or 0] if device.type == "cuda" else []
    # torch's seed and default dtype are process-global: one seeded build at a time, both restored after
    with _SEED_LOCK, torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                model = FleetGr00tModel(config)
        finally:
            torch.set_default_dtype(previous)
    return model.eval()


def write_demo_checkpoint(
    out_dir: str | os.PathLike, preset: str, embodiments: Sequence[str], seed: int, *, model=None
) -> Path:
    """Write all files of a demo checkpoint into `out_dir` (an existing, empty directory). `model`: weights
    already built (e.g. by :func:`build_demo_model` on a GPU); default: built here, on the CPU."""
    from .configuration import FleetGr00tConfig

    out = Path(out_dir)
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    config = FleetGr00tConfig.from_preset(preset)
    if len(embodiments) > config.max_num_embodiments:
        raise ValueError(f"{len(embodiments)} embodiments, the model has {config.max_num_embodiments} slots")

    entries: dict[str, Any] = {}
    statistics: dict[str, Any] = {}
    for tag in embodiments:
        layout = embodiment_layout(tag)
        entries[tag] = embodiment_entry(layout["modality_configs"], layout["state_dims"], layout["action_dims"])
        statistics[tag] = embodiment_statistics(tag, layout, seed)
        n_action = sum(layout["action_dims"].values())
        if n_action > config.max_action_dim:
            raise ValueError(f"{tag}: {n_action} action dims > the {preset} model's max_action_dim {config.max_action_dim}")

    if model is None:
        model = build_demo_model(preset, seed=seed, config=config)
    model.save_pretrained(str(out))
    del model

    write_processor_config(
        out,
        image_size=config.image_size,
        max_text_length=MAX_TEXT_LENGTH,
        embodiments=entries,
        use_percentiles=False,
        clip_outliers=True,
        fleet_demo={"preset": preset, "seed": int(seed), "embodiments": list(embodiments),
                    "generator": "policy.make_demo_checkpoint"},
    )
    write_statistics(out, statistics)
    write_embodiment_ids(out, {tag: i for i, tag in enumerate(embodiments)})
    save_tokenizer(out, build_tokenizer(config.llm_config.vocab_size, MAX_TEXT_LENGTH))
    return out


def _current_umask() -> int:
    # Read, not os.umask(0)+restore: that would race with other threads creating files.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _publishable(path: Path) -> None:
    """mkdtemp makes a 0700 directory: give the tree the modes a plain mkdir / open would (umask applies)."""
    umask = _current_umask()
    os.chmod(path, 0o777 & ~umask)
    for child in path.rglob("*"):
        os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~umask)


def _check_existing(out: Path, preset: str, tags: Sequence[str]) -> Path:
    info = read_checkpoint(out)
    demo = info.processor_config.get("fleet_demo")
    if isinstance(demo, dict) and demo.get("preset") not in (None, preset):
        raise CheckpointError(
            f"checkpoint {out / 'processor_config.json'}: a demo checkpoint of preset {demo.get('preset')!r} is "
            f"already there, {preset!r} was asked for (remove the directory or choose another)"
        )
    for tag in tags:
        info.embodiment(tag)  # raises, listing the tags it holds
    return out


def build_demo_checkpoint(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    embodiments: Iterable[str] | str = DEFAULT_EMBODIMENTS,
    seed: int = 0,
) -> Path:
    """Build a demo checkpoint at `out_dir` (replacing what is there). Atomic: built in a temporary directory
    beside it, then renamed into place."""
    tags = _normalise_embodiments(embodiments)
    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_demo_checkpoint(tmp, preset, tags, seed)
        _publishable(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_demo_checkpoint(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    embodiments: Iterable[str] | str = DEFAULT_EMBODIMENTS,
    seed: int = 0,
) -> Path:
    """The demo checkpoint at `out_dir`, built only if missing. Safe when several processes race: each builds
    into its own temporary directory beside `out_dir` and renames it into place; a loser of the race removes
    its copy and uses the winner's. An existing checkpoint must hold the embodiments (and preset) asked for."""
    tags = _normalise_embodiments(embodiments)
    out = Path(out_dir).expanduser().absolute()
    if (out / "config.json").exists():
        return _check_existing(out, preset, tags)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Replicas starting together wait for the first one's build instead of each building a copy (an n16-3b
    # build is minutes and gigabytes); the rename below stays the guarantee where flock does not hold (NFS).
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        try:
            return _ensure_locked(out, preset, tags, seed)
        finally:
            # Safe to remove once the checkpoint is there: a caller still waiting on this (now nameless) lock
            # and one that makes a new lock file both find config.json and return without building.
            if (out / "config.json").exists():
                lock_path.unlink(missing_ok=True)


def _ensure_locked(out: Path, preset: str, tags: list[str], seed: int) -> Path:
    if (out / "config.json").exists():
        return _check_existing(out, preset, tags)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if (out / "config.json").exists():  # another process renamed its build in since the check above
            return _check_existing(out, preset, tags)
        raise CheckpointError(f"not a checkpoint directory: {out} (exists, not empty, no config.json)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_demo_checkpoint(tmp, preset, tags, seed)
        _publishable(tmp)
        try:
            os.rename(tmp, out)  # atomic; replaces an empty directory, fails on a non-empty one
            return out
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _check_existing(out, preset, tags)  # lost the race: use the winner's


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m policy.make_demo_checkpoint",
        description="Build a demo checkpoint with random weights and plausible statistics (offline, deterministic).",
    )
    parser.add_argument("out_dir", help="directory to create")
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--embodiments", default=",".join(DEFAULT_EMBODIMENTS),
                        help="comma-separated tags (default: gr1,unitree_g1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        print(f"error: {out} exists (use --force to replace it)", file=sys.stderr)
        return 1
    try:
        path = build_demo_checkpoint(out, args.preset, args.embodiments, args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = read_checkpoint(path)
    print(f"wrote {path} (preset {args.preset}, embodiments {', '.join(info.tags)}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
