"""Demo GR00T N1.6 and N1.7 checkpoints (random weights, plausible statistics), built offline and deterministically.

    python -m policy.make_demo_checkpoint OUT_DIR --preset {tiny,small,n16-3b,n17-small,n17-3b,tiny-smooth,small-smooth}
                                                  [--embodiments gr1,unitree_g1] [--seed 0] [--force]

The files are a GR00T checkpoint in NVIDIA's layout (config.json, model.safetensors with NVIDIA's parameter names,
processor_config.json, statistics.json with per-step relative-action statistics, embodiment_id.json), so
everything that serves a demo checkpoint serves a real one the same way. ``model_name`` names the backbone folder,
``backbone/``, with the preset's backbone config.json and a small tokenizer and chat template of our own (no
download). Same arguments -> same files, byte for byte.

GR00T N1.6 presets (config.json holds only the fields that differ from N1.6's defaults; ``backbone/`` is
Eagle-style, Eagle's special tokens): ``tiny`` (tests: a few-ms forward pass), ``small`` (the CPU demo),
``n16-3b`` (GR00T-N1.6-3B's real dimensions: SigLIP2-so400m-sized vision tower, Qwen3-1.7B cut at 16 layers,
32-layer DiT; for GPU figures).

Smooth presets ``tiny-smooth`` and ``small-smooth``: ``tiny`` / ``small`` whose action head is briefly trained at
build time on a synthetic task (policy.demo_training), so chunks move smoothly; relative-action statistics are
the task's bounds; the training recipe is recorded in config.json and a cached copy of another recipe is rebuilt.

GR00T N1.7 presets (config.json holds every field, as NVIDIA writes it; ``backbone/`` is a Qwen3-VL processor
folder: config.json, a byte-level BPE tokenizer.json with Qwen3-VL's special tokens, chat_template.jinja,
preprocessor_config.json): ``n17-small`` (tests and the CPU demo: a few tens of ms per forward) and ``n17-3b``
(GR00T-N1.7-3B's real dimensions: Cosmos-Reason2-2B's vision tower and text model cut at 16 layers, a 4-block VL
self-attention, a 32-layer DiT, horizon 40, state/action padded to 132; for GPU figures).

Embodiment layouts:

- ``gr1`` (the N1.6 gr1 tutorial): camera ``ego_view_bg_crop_pad_res256_freq20`` (1 frame); states left_arm 7,
  right_arm 7, left_hand 6, right_hand 6, waist 3; 16-step actions over the same keys (arms and waist RELATIVE
  to their state, hands ABSOLUTE); language ``annotation.human.task_description``.
- ``unitree_g1``: cameras ``ego_view`` and ``wrist_view``; states left_leg 6, right_leg 6 (mean/std
  normalised), waist 3 (sin/cos encoded), left_arm 7, right_arm 7, left_hand 7, right_hand 7; 16-step actions
  over arms (RELATIVE), hands, waist and base_height_command 1 (mean/std).
- any other tag: generic, camera ``front_view``, state ``joints`` 7, action ``joints`` 7 (ABSOLUTE).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from clients.modality import ActionConfig, ActionRepresentation, ActionType, ModalityConfig

from .checkpoint import (
    DEFAULT_EMBODIMENT_IDS,
    N1D6,
    N1D7,
    PROCESSOR_CONFIG_FILE,
    CheckpointError,
    read_checkpoint,
    read_json,
    write_json,
)
from .configuration_gr00t_n1d6 import (
    N1D6_DIFFUSION_MODEL_CFG,
    EagleBackboneConfig,
    Gr00tN1d6Config,
    Qwen3TextConfig,
    SiglipVisionConfig,
)
from .configuration_gr00t_n1d7 import Gr00tN1d7Config
from .demo_training import SMOOTH_PRESETS, base_preset, recipe_for, smooth_relative_statistics
from .embodiment import resolve_tag

DEFAULT_EMBODIMENTS = ("gr1", "unitree_g1")
N17_PRESETS = ("n17-small", "n17-3b")
PRESETS = ("tiny", "small", "n16-3b", *N17_PRESETS, *SMOOTH_PRESETS)
LANGUAGE_KEY = "annotation.human.task_description"
ACTION_HORIZON = 16
BACKBONE_DIR = "backbone"

# Eagle's special tokens, at the head of our vocabulary (the ids are ours; backbone/config.json records them).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>", "<img>", "</img>", "[UNK]")
IMAGE_TOKEN = "<IMG_CONTEXT>"
# Words the demo vocabulary holds whole; anything else is spelt with characters (WordPiece "##" pieces).
TASK_WORDS = """
system you are helpful assistant user image
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
square flat soft hard full other same first second last all each both robot gripper arm arms slowly
""".split()

# Our chat template: Eagle's prompt layout (a default system turn, the text before the images).
CHAT_TEMPLATE = (
    "{% set n = namespace(images=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set n.images = n.images + 1 %}<image-{{ n.images }}>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)


@dataclasses.dataclass(frozen=True)
class Preset:
    backbone: EagleBackboneConfig
    model: dict[str, Any]  # Gr00tN1d6Config fields that differ from N1.6's defaults
    image_edge: int  # processor shortest_image_edge (the square side after GR00T's transform)


def _preset(name: str) -> Preset:
    if name in SMOOTH_PRESETS:
        # The random preset's backbone (its forward cost) with one small head, trained at build time: 128 wide,
        # since tiny's 32 cannot carry 29 action dims of noise through (its loss stalled near 1), and 2 blocks,
        # since small's 8 blocks of 512 would take several minutes of CPU per hundred steps.
        p = _preset(base_preset(name))
        head = dict(hidden_size=128, input_embedding_dim=128, diffusion_model_cfg=dict(
            p.model["diffusion_model_cfg"], num_layers=2, num_attention_heads=2, attention_head_dim=64, output_dim=128))
        return dataclasses.replace(p, model={**p.model, **head})
    name = base_preset(name)  # a smooth preset is its random preset's architecture, trained
    if name == "tiny":
        return Preset(
            EagleBackboneConfig(
                vision=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                          num_patches=16),
                text=Qwen3TextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16),
                image_token_index=SPECIAL_TOKENS.index(IMAGE_TOKEN), source="tiny demo backbone",
            ),
            dict(select_layer=1, backbone_embedding_dim=32, max_state_dim=64, max_action_dim=32, hidden_size=32,
                 input_embedding_dim=32, max_seq_len=64,
                 diffusion_model_cfg=dict(N1D6_DIFFUSION_MODEL_CFG, num_layers=2, num_attention_heads=2,
                                          attention_head_dim=16, output_dim=32)),
            image_edge=56,
        )
    if name == "small":
        return Preset(
            EagleBackboneConfig(
                vision=SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                          num_attention_heads=6),
                text=Qwen3TextConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4, head_dim=64),
                image_token_index=SPECIAL_TOKENS.index(IMAGE_TOKEN), source="small demo backbone",
            ),
            dict(select_layer=4, backbone_embedding_dim=512, max_state_dim=64, max_action_dim=32, hidden_size=512,
                 input_embedding_dim=512, max_seq_len=64,
                 diffusion_model_cfg=dict(N1D6_DIFFUSION_MODEL_CFG, num_layers=8, num_attention_heads=8,
                                          attention_head_dim=64, output_dim=512)),
            image_edge=224,
        )
    if name == "n16-3b":  # the released model's sizes; our tokenizer's ids are small, the embedding table is not
        return Preset(
            EagleBackboneConfig(image_token_index=SPECIAL_TOKENS.index(IMAGE_TOKEN), source="n16-3b demo backbone"),
            dict(max_state_dim=128, max_action_dim=32),
            image_edge=256,
        )
    raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")


def preset_config(name: str) -> tuple[Gr00tN1d6Config, EagleBackboneConfig] | tuple[Gr00tN1d7Config, dict[str, Any]]:
    """(model config, backbone config): an EagleBackboneConfig for N1.6 presets, a Qwen3-VL config dict for N1.7."""
    if name in N17_PRESETS:
        p7 = _n17_preset(name)
        return p7.config, p7.backbone
    p = _preset(name)
    return Gr00tN1d6Config.from_checkpoint_dict({"model_type": N1D6, **p.model}, f"preset {name}"), p.backbone


def generation(preset: str) -> str:
    """The model_type a preset's checkpoint has."""
    return N1D7 if preset in N17_PRESETS else N1D6


# ----------------------------------------------------------------------------------------------------------------
# GR00T N1.7 presets
# ----------------------------------------------------------------------------------------------------------------

# Qwen3-VL's special tokens, after our byte-level vocabulary (the ids are ours; backbone/config.json records them).
N17_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
N17_BPE_VOCAB = 448  # byte alphabet + merges learnt from the task words; the special tokens come after
# Qwen's pre-tokenisation split (contractions, letter runs, single digits, punctuation runs, newlines, spaces).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3-VL's prompt layout for N1.7: one user turn, an image marker per image, then the text; no system turn.
N17_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class N17Preset:
    config: Gr00tN1d7Config
    backbone: dict[str, Any]  # the Qwen3-VL config.json of backbone/
    image_edge: int  # processor shortest_image_edge
    min_pixels: int  # Qwen image processor size.shortest_edge / longest_edge (pixel-count bounds)
    max_pixels: int


def n17_token_ids() -> dict[str, int]:
    return {t: N17_BPE_VOCAB + i for i, t in enumerate(N17_SPECIAL_TOKENS)}


def _qwen3_vl_config(vision: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    """Cosmos-Reason2-2B's config.json with the given sizes and our tokenizer's special-token ids."""
    from .modeling_gr00t_n1d7 import COSMOS_REASON2_2B

    ids = n17_token_ids()
    cfg = json.loads(json.dumps(COSMOS_REASON2_2B))
    cfg.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
               vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    cfg["text_config"].update(text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    cfg["vision_config"].update(vision)
    return cfg


def _n17_preset(name: str) -> N17Preset:
    if name == "n17-small":
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, num_position_embeddings=256,
                      out_hidden_size=128, deepstack_visual_indexes=[0])
        text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=4096,
                    rope_scaling={"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"})
        vsa = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 64}
        dit = dict(num_layers=4, num_attention_heads=2, attention_head_dim=64, output_dim=128)
        config = {"select_layer": 2, "backbone_embedding_dim": 128, "max_state_dim": 64, "max_action_dim": 32,
                  "action_horizon": 16, "hidden_size": 128, "input_embedding_dim": 128, "max_seq_len": 64,
                  "vl_self_attention_cfg": {**vsa, "positional_embeddings": None},
                  "diffusion_model_cfg": {"positional_embeddings": None, "norm_type": "ada_norm",
                                          "interleave_self_attention": True, **dit}}
        return N17Preset(Gr00tN1d7Config.from_checkpoint_dict(config, f"preset {name}"),
                         _qwen3_vl_config(vision, text), image_edge=96, min_pixels=1024, max_pixels=65536)
    if name == "n17-3b":  # GR00T-N1.7-3B: Cosmos-Reason2-2B's sizes; N1.7's config defaults are the 3B model's
        return N17Preset(Gr00tN1d7Config(), _qwen3_vl_config({}, {}), image_edge=256,
                         min_pixels=65536, max_pixels=16777216)
    raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")


def build_n17_tokenizer():
    """A byte-level BPE tokenizer in Qwen's form (NFC, Qwen's split, byte-level), its merges learnt from the task
    words (deterministic), then Qwen3-VL's special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=N17_BPE_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    corpus = [" ".join(TASK_WORDS[i : i + 8]) for i in range(0, len(TASK_WORDS), 8)]
    tok.train_from_iterator(corpus, trainer=trainer)
    if tok.get_vocab_size() > N17_BPE_VOCAB:
        raise ValueError(f"tokenizer: {tok.get_vocab_size()} base tokens, more than {N17_BPE_VOCAB}")
    # Pad the base vocabulary to exactly N17_BPE_VOCAB so the special tokens' ids are fixed.
    while tok.get_vocab_size() < N17_BPE_VOCAB:
        tok.add_tokens([f"<|unused_{tok.get_vocab_size()}|>"])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in N17_SPECIAL_TOKENS])
    ids = n17_token_ids()
    if any(tok.token_to_id(t) != i for t, i in ids.items()):
        raise ValueError("tokenizer: Qwen3-VL's special tokens did not get their fixed ids")
    return tok


def write_qwen3_vl_folder(out: Path, preset: N17Preset) -> None:
    """backbone/ of an N1.7 demo: the Qwen3-VL config.json, our tokenizer, the chat template and the image / video
    processor settings (Qwen3-VL's layout; tokenizer_config.json in the form transformers 4.57 and 5.x read)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"architectures": ["Qwen3VLForConditionalGeneration"], **preset.backbone})
    build_n17_tokenizer().save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left", "model_max_length": 262144,
        "clean_up_tokenization_spaces": False, "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "unk_token": None,
    })
    (out / "chat_template.jinja").write_text(N17_CHAT_TEMPLATE, encoding="utf-8")
    vision = preset.backbone["vision_config"]
    image = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "resample": 3,
        "patch_size": vision["patch_size"], "merge_size": vision["spatial_merge_size"],
        "temporal_patch_size": vision["temporal_patch_size"], "processor_class": "Qwen3VLProcessor",
    }
    write_json(out / "preprocessor_config.json", {
        **image, "image_processor_type": "Qwen2VLImageProcessorFast",
        "size": {"shortest_edge": preset.min_pixels, "longest_edge": preset.max_pixels},
    })
    write_json(out / "video_preprocessor_config.json", {
        **image, "video_processor_type": "Qwen3VLVideoProcessor", "do_sample_frames": True, "fps": 2,
        "min_frames": 4, "max_frames": 768, "return_metadata": False,
        "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
    })


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def demo_vocabulary(limit: int) -> list[str]:
    """Eagle's special tokens, printable ASCII (lower case), "##" continuations of letters and digits, then task
    words while they fit in ``limit``."""
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


def build_tokenizer(vocab_size_limit: int, special_ids: dict[str, int] | None = None):
    """A WordPiece tokenizer (``tokenizers.Tokenizer``; lower-casing, Eagle's special tokens matched whole).
    ``special_ids``: ids for Eagle's special tokens (e.g. Eagle's own, to pair our tokenizer with a backbone
    that expects them); by default they lead the vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(demo_vocabulary(min(vocab_size_limit, 4096)))}
    if special_ids:
        ordinary = [t for t in vocab if t not in special_ids]
        vocab = {t: i for i, t in enumerate(ordinary)}
        taken = set(vocab.values())
        if taken & set(special_ids.values()):
            raise ValueError("tokenizer: special_ids collide with the ordinary vocabulary's ids")
        vocab.update(special_ids)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_backbone_folder(out: Path, backbone: EagleBackboneConfig) -> None:
    """backbone/: the backbone's config.json, our tokenizer and chat template (Eagle folder layout)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", backbone.to_dict())
    write_tokenizer_folder(out, backbone.text.vocab_size)


def write_tokenizer_folder(out: Path, vocab_size_limit: int, special_ids: dict[str, int] | None = None) -> None:
    """Our tokenizer and chat template in ``out``; its config written by hand in the form transformers 4.x and
    5.x both read."""
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size_limit, special_ids).save(str(out / "tokenizer.json"))
    special = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "[UNK]",
               "additional_special_tokens": ["<|im_start|>", IMAGE_TOKEN, "<img>", "</img>"]}
    write_json(out / "special_tokens_map.json", special)
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left",
                                               "model_max_length": 32768, "clean_up_tokenization_spaces": False,
                                               **special})
    write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})


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
    action_mean_std = None
    if tag == "gr1":
        state_dims = {"left_arm": 7, "right_arm": 7, "left_hand": 6, "right_hand": 6, "waist": 3}
        action_dims = dict(state_dims)
        acfg = {"left_arm": _rel("left_arm"), "right_arm": _rel("right_arm"), "left_hand": _abs(),
                "right_hand": _abs(), "waist": _rel("waist")}
        video = ModalityConfig(delta_indices=[0], modality_keys=["ego_view_bg_crop_pad_res256_freq20"])
        state = ModalityConfig(delta_indices=[0], modality_keys=list(state_dims))
    elif tag == "unitree_g1":
        state_dims = {"left_leg": 6, "right_leg": 6, "waist": 3, "left_arm": 7, "right_arm": 7, "left_hand": 7,
                      "right_hand": 7}
        action_dims = {"left_arm": 7, "right_arm": 7, "left_hand": 7, "right_hand": 7, "waist": 3,
                       "base_height_command": 1}
        acfg = {"left_arm": _rel("left_arm"), "right_arm": _rel("right_arm"), "left_hand": _abs(),
                "right_hand": _abs(), "waist": _abs(), "base_height_command": _abs()}
        video = ModalityConfig(delta_indices=[0], modality_keys=["ego_view", "wrist_view"])
        state = ModalityConfig(delta_indices=[0], modality_keys=list(state_dims), sin_cos_embedding_keys=["waist"],
                               mean_std_embedding_keys=["left_leg", "right_leg"])
        action_mean_std = ["base_height_command"]
    else:
        state_dims = {"joints": 7}
        action_dims = {"joints": 7}
        acfg = {"joints": _abs()}
        video = ModalityConfig(delta_indices=[0], modality_keys=["front_view"])
        state = ModalityConfig(delta_indices=[0], modality_keys=["joints"])
    action = ModalityConfig(delta_indices=horizon, modality_keys=list(action_dims),
                            mean_std_embedding_keys=action_mean_std, action_configs=[acfg[k] for k in action_dims])
    return {"modality_configs": {"video": video, "state": state, "action": action, "language": language},
            "state_dims": state_dims, "action_dims": action_dims}


def _range_for(key: str, rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    if key.endswith("hand"):
        return rng.uniform(0.0, 0.1, d), rng.uniform(1.2, 1.7, d)
    if key.endswith("arm") or key == "joints":
        return rng.uniform(-3.1, -1.0, d), rng.uniform(1.0, 3.1, d)
    if key.endswith("leg"):
        return rng.uniform(-2.5, -0.8, d), rng.uniform(0.8, 2.5, d)
    if key == "base_height_command":
        return rng.uniform(0.55, 0.6, d), rng.uniform(0.75, 0.8, d)
    return rng.uniform(-1.0, -0.3, d), rng.uniform(0.3, 1.0, d)  # waist and anything else


def _stats(lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator) -> dict[str, list]:
    span = hi - lo
    mean = (lo + hi) / 2 + rng.uniform(-0.1, 0.1, lo.shape) * span
    std = span / rng.uniform(4.0, 8.0, lo.shape)
    q01 = lo + rng.uniform(0.005, 0.03, lo.shape) * span
    q99 = hi - rng.uniform(0.005, 0.03, lo.shape) * span
    return {name: np.round(v, 6).tolist() for name, v in
            (("min", lo), ("max", hi), ("mean", mean), ("std", std), ("q01", q01), ("q99", q99))}


def embodiment_statistics(tag: str, layout: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Deterministic plausible statistics: joint ranges in radians, hands 0..1.7; relative actions per step,
    widening with the step (+-0.05..0.4 rad)."""
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
        if ac.rep == ActionRepresentation.RELATIVE:
            grow = np.linspace(0.05, 0.4, ACTION_HORIZON)[:, None] * rng.uniform(0.5, 1.0, d)
            relative[key] = _stats(-grow, grow, rng)
    out = {"state": state, "action": action}
    if relative:
        out["relative_action"] = relative
    return out


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def demo_dtype(preset: str):
    """The dtype a demo checkpoint stores: bf16 for the 3B model (halves the file), fp32 for tiny / small."""
    import torch

    return torch.bfloat16 if base_preset(preset) in ("n16-3b", "n17-3b") else torch.float32


def build_demo_model(preset: str, *, seed: int = 0, dtype=None, device=None):
    """A demo model with seeded random weights, drawn directly in ``dtype`` (default :func:`demo_dtype`) on
    ``device`` (default the CPU): never a float32 copy first (12 GB at n16-3b). Same arguments, same weights.

    Variance-preserving draws (weights N(0, 1/fan_in), embeddings N(0, 1), norms 1, biases 0) so that a random
    model's actions depend on its inputs at every depth."""
    import torch
    from torch import nn

    config, backbone = preset_config(preset)
    dtype = demo_dtype(preset) if dtype is None else dtype
    device = torch.device("cpu" if device is None else device)
    if generation(preset) == N1D7:
        from .modeling_gr00t_n1d7 import Gr00tN1d7 as model_class
    else:
        from .modeling_gr00t_n1d6 import Gr00tN1d6 as model_class
    with torch.device("meta"):
        model = model_class(config, backbone)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    for name, param in list(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        data = torch.empty(param.shape, dtype=dtype, device=device)
        if leaf in ("bias", "b"):
            data.zero_()
        elif param.dim() == 1:  # LayerNorm / RMSNorm scales
            data.fill_(1.0)
        elif "embed_tokens" in name or "position_embedding" in name or name.endswith("pos_embed.weight"):
            data.normal_(0.0, 1.0, generator=gen)
        else:
            # (K, in, out) per-embodiment matrices; else (out, in, *kernel): Linear, Conv3d patch embedding.
            fan_in = param.shape[-2] if leaf == "W" else math.prod(param.shape[1:])
            data.normal_(0.0, fan_in**-0.5, generator=gen)
        owner, _, _ = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = nn.Parameter(data, requires_grad=False)
    if generation(preset) == N1D7:
        from .modeling_gr00t_n1d7 import materialize_buffers

        materialize_buffers(model, device)
    return model.eval()


def save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}
    save_file(tensors, str(path), metadata={"format": "pt"})


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


def embodiment_ids(tags: Sequence[str], slots: int, model_type: str = N1D6) -> dict[str, int]:
    """NVIDIA's rows for the tags it knows (per generation), the lowest free rows for the others."""
    known = DEFAULT_EMBODIMENT_IDS[model_type]
    ids = {t: known[t] for t in tags if t in known}
    free = (i for i in range(slots) if i not in set(known.values()) | set(ids.values()))
    for t in tags:
        if t not in ids:
            ids[t] = next(free)
    return ids


def write_demo_checkpoint(out_dir: str | os.PathLike, preset: str, embodiments: Sequence[str], seed: int, *,
                          model=None) -> Path:
    """Write every file of a demo checkpoint into ``out_dir`` (an empty or new directory). ``model``: weights
    already built (e.g. by :func:`build_demo_model` on a GPU); default: built here, on the CPU."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, backbone = preset_config(preset)
    if len(embodiments) > config.max_num_embodiments:
        raise ValueError(f"{len(embodiments)} embodiments, the model has {config.max_num_embodiments} slots")
    modality_configs: dict[str, Any] = {}
    statistics: dict[str, Any] = {}
    recipe = recipe_for(preset)
    for tag in embodiments:
        layout = embodiment_layout(tag)
        modality_configs[tag] = {m: mc.to_json() for m, mc in layout["modality_configs"].items()}
        statistics[tag] = embodiment_statistics(tag, layout, seed)
        if recipe is not None:  # relative actions' statistics: the smooth task's bounds (no target is clipped)
            statistics[tag] = smooth_relative_statistics(tag, layout, statistics[tag], recipe, ACTION_HORIZON)
        n_action = sum(layout["action_dims"].values())
        if n_action > config.max_action_dim:
            raise ValueError(f"{tag}: {n_action} action dims > the {preset} model's max_action_dim {config.max_action_dim}")
    if model is None:
        model = build_demo_model(preset, seed=seed)
    save_weights(model, out / "model.safetensors")
    del model
    demo = {"preset": preset, "seed": int(seed), "embodiments": list(embodiments), "generator": "policy.make_demo_checkpoint"}
    if recipe is not None:  # what a cached copy is checked against (ensure_demo_checkpoint rebuilds on a change)
        demo["training"] = {"recipe": recipe.to_json(), "fingerprint": recipe.fingerprint()}
    if generation(preset) == N1D7:
        _write_n17_files(out, _n17_preset(preset), modality_configs, statistics, embodiments, demo)
        return out
    p = _preset(preset)
    write_json(out / "config.json", {
        "architectures": [N1D6], "model_type": N1D6, "model_name": BACKBONE_DIR, **p.model,
        "apply_sincos_state_encoding": True, "use_relative_action": True,
        "fleet_demo": demo,
    })
    write_json(out / PROCESSOR_CONFIG_FILE, {
        "processor_class": "Gr00tN1d6Processor",
        "processor_kwargs": {
            "modality_configs": modality_configs,
            "image_crop_size": None, "image_target_size": None, "use_albumentations": True,
            "random_rotation_angle": None, "color_jitter_params": None,
            "shortest_image_edge": p.image_edge, "crop_fraction": 0.95,
            "model_name": BACKBONE_DIR, "model_type": "eagle", "formalize_language": True,
            "max_state_dim": config.max_state_dim, "max_action_dim": config.max_action_dim,
            "max_action_horizon": config.action_horizon, "use_percentiles": False, "clip_outliers": True,
            "apply_sincos_state_encoding": True, "use_relative_action": True,
        },
    })
    write_json(out / "statistics.json", statistics)
    write_json(out / "embodiment_id.json", embodiment_ids(embodiments, config.max_num_embodiments))
    write_backbone_folder(out / BACKBONE_DIR, backbone)
    if recipe is not None:
        _train_smooth(out, config, backbone, recipe, embodiments, seed)
    return out


def _train_smooth(out: Path, config, backbone, recipe, embodiments: Sequence[str], seed: int) -> None:
    """Train the head of the random checkpoint just written at ``out`` (policy.demo_training) and rewrite its
    weights. The processors are the ones serving builds from these files, so training sees what serving sees."""
    import torch

    from .demo_training import train_head
    from .modeling_gr00t_n1d6 import load_model
    from .processing_gr00t_n1d6 import Gr00tN1d6Processor
    from .tokenization import load_chat_template, load_tokenizer

    info = read_checkpoint(out)
    model = load_model(out, config, backbone, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer, template = load_tokenizer(out / BACKBONE_DIR), load_chat_template(out / BACKBONE_DIR)
    processors = {tag: Gr00tN1d6Processor(info.embodiment(tag), info.processor_kwargs, config, backbone, tokenizer,
                                          template) for tag in embodiments}
    summary = train_head(model, processors, recipe, seed,
                         log=lambda m: print(m, file=sys.stderr) if os.environ.get("FLEET_DEMO_TRAIN_LOG") else None)
    if os.environ.get("FLEET_DEMO_TRAIN_LOG"):
        print(f"trained the head: {summary}", file=sys.stderr)
    save_weights(model, out / "model.safetensors")


def _write_n17_files(out: Path, p: N17Preset, modality_configs: dict[str, Any], statistics: dict[str, Any],
                     embodiments: Sequence[str], demo: dict[str, Any]) -> None:
    """The JSON side and backbone/ of an N1.7 demo checkpoint, in the layout NVIDIA's N1.7 code writes."""
    cfg = p.config
    image = {"image_crop_size": None, "image_target_size": None, "shortest_image_edge": p.image_edge,
             "crop_fraction": 0.95, "random_rotation_angle": None, "color_jitter_params": None,
             "letter_box_transform": False, "formalize_language": True}
    normalisation = {"use_percentiles": True, "use_mean_std": False, "apply_sincos_state_encoding": True,
                     "use_relative_action": True, "exclude_state": False}
    body = {**cfg.to_checkpoint_dict(), **normalisation, "model_name": BACKBONE_DIR}
    write_json(out / "config.json", {**body, **image, "use_albumentations_transforms": True, "fleet_demo": demo})
    write_json(out / PROCESSOR_CONFIG_FILE, {
        "processor_class": "Gr00tN1d7Processor",
        "processor_kwargs": {
            "modality_configs": modality_configs, **image, "use_albumentations": True,
            "model_name": BACKBONE_DIR, "model_type": "qwen", "max_state_dim": cfg.max_state_dim,
            "max_action_dim": cfg.max_action_dim, "max_action_horizon": cfg.action_horizon, **normalisation,
            "clip_outliers": True, "state_dropout_prob": 0.0,
        },
    })
    write_json(out / "statistics.json", statistics)
    write_json(out / "embodiment_id.json", embodiment_ids(embodiments, cfg.max_num_embodiments, N1D7))
    write_qwen3_vl_folder(out / BACKBONE_DIR, p)


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
    demo = info.config.get("fleet_demo")
    if isinstance(demo, dict) and demo.get("preset") not in (None, preset):
        raise CheckpointError(
            f"checkpoint {out / 'config.json'}: a demo checkpoint of preset {demo.get('preset')!r} is already there, "
            f"{preset!r} was asked for (remove the directory or choose another)"
        )
    for tag in tags:
        info.embodiment(tag)  # raises, listing the tags it holds
    return out


def _stale(out: Path, preset: str) -> bool:
    """A cached demo checkpoint of a trained preset built by another training recipe (the recipe's fingerprint
    is the cache key beside the directory name): it must be rebuilt, not served as if it were this recipe's."""
    recipe = recipe_for(preset)
    if recipe is None:
        return False
    try:
        demo = read_json(out / "config.json").get("fleet_demo")
    except (OSError, ValueError, CheckpointError):
        return False  # not ours to judge: _check_existing names what is wrong
    if not isinstance(demo, dict) or demo.get("preset") != preset:
        return False
    training = demo.get("training")
    return not isinstance(training, dict) or training.get("fingerprint") != recipe.fingerprint()


def build_demo_checkpoint(out_dir: str | os.PathLike, preset: str = "tiny",
                          embodiments: Iterable[str] | str = DEFAULT_EMBODIMENTS, seed: int = 0) -> Path:
    """Build a demo checkpoint at ``out_dir`` (replacing what is there). Atomic: built in a temporary directory
    beside it, then renamed into place."""
    tags = _normalise_embodiments(embodiments)
    preset_config(preset)
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


def ensure_demo_checkpoint(out_dir: str | os.PathLike, preset: str = "tiny",
                           embodiments: Iterable[str] | str = DEFAULT_EMBODIMENTS, seed: int = 0) -> Path:
    """The demo checkpoint at ``out_dir``, built only if missing. Safe when several processes race: each builds
    into its own temporary directory beside ``out_dir`` and renames it into place; a loser of the race removes
    its copy and uses the winner's. An existing checkpoint must hold the embodiments (and preset) asked for."""
    tags = _normalise_embodiments(embodiments)
    out = Path(out_dir).expanduser().absolute()
    if (out / "config.json").exists() and not _stale(out, preset):
        return _check_existing(out, preset, tags)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Callers starting together wait for the first one's build instead of each building a copy (an n16-3b
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
        if not _stale(out, preset):
            return _check_existing(out, preset, tags)
        held = read_json(out / "config.json")["fleet_demo"].get("embodiments") or []
        # another recipe's: replaced (atomically), keeping the embodiments it held
        return build_demo_checkpoint(out, preset, [*held, *(t for t in tags if t not in held)], seed)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"not a checkpoint directory: {out} (exists, not empty, no config.json)")
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
        description="Build a GR00T N1.6 / N1.7 demo checkpoint with random weights and plausible statistics "
                    "(offline, deterministic).",
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
