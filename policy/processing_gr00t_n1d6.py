"""GR00T N1.6 pre-processing, for a whole batch: observations -> model inputs (and the decoding back).

Per camera frame (sample-major, then frame, then camera in ``video.modality_keys`` order):
GR00T's evaluation transform (policy.image_transforms), then Eagle's resize of each side to the nearest multiple
of 28 (Pillow bicubic, within 3136..3,211,264 pixels), then (u8 - 127.5) / 127.5.

Prompt per sample: the instruction (the language key's first entry; lower-cased, punctuation removed with
``formalize_language``) rendered with the backbone's chat template as one user turn with the text BEFORE the
images (``...user\\n{text}<image-1><image-2><|im_end|>\\n``, after a default system turn), each ``<image-k>``
expanded to ``<image k><img>`` + one ``<IMG_CONTEXT>`` per image token + ``</img>``, tokenised without special
tokens, the batch padded on the LEFT.

States are normalised and actions decoded by policy.state_action.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .checkpoint import EmbodimentSpec
from .configuration_gr00t_n1d6 import EagleBackboneConfig, Gr00tN1d6Config
from .hot_path import pad_rows
from .image_transforms import Gr00tImageTransform
from .state_action import StateActionCodec
from .tokenization import formalize_language, render_chat

MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 4096 * 28 * 28
MAX_SIDE = 500 * 14
MAX_RATIO = 200
PROMPT_CACHE_SIZE = 1024
_PLACEHOLDER = re.compile(r"<(image|video)-(\d+)>")


def eagle_image_size(height: int, width: int, factor: int = 28) -> tuple[int, int]:
    """Eagle's resize target: each side to the nearest multiple of ``factor`` (ties to even), bounded in area."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"image of {height}x{width}: aspect ratio above {MAX_RATIO}")
    h = min(max(factor, round(height / factor) * factor), MAX_SIDE)
    w = min(max(factor, round(width / factor) * factor), MAX_SIDE)
    if h * w > MAX_PIXELS:
        beta = math.sqrt(h * w / MAX_PIXELS)
        h, w = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif h * w < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def default_chat_text(text: str, num_images: int) -> str:
    """The prompt layout of Eagle's chat template, for tokenizers that come without a template."""
    images = "".join(f"<image-{k}>" for k in range(1, num_images + 1))
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{text}{images}<|im_end|>\n")


class Gr00tN1d6Processor:
    """One embodiment's pre- and post-processing for a loaded N1.6 model."""

    def __init__(self, spec: EmbodimentSpec, processor_kwargs: Mapping[str, Any], config: Gr00tN1d6Config,
                 backbone: EagleBackboneConfig, tokenizer: Any, chat_template: str | None,
                 where: str = "processor_config.json"):
        kw = processor_kwargs
        self.spec = spec
        self.transform = Gr00tImageTransform.from_processor_kwargs(kw, letter_box_default=True, where=where)
        self.formalize = bool(kw.get("formalize_language", True))
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token_id = backbone.image_token_index
        self.factor = backbone.vision.patch_size * backbone.unshuffle
        self.pixels_per_token = self.factor**2
        ids = tokenizer.convert_tokens_to_ids(["<IMG_CONTEXT>", "<img>", "</img>"])
        if ids[0] != self.image_token_id or any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError(
                f"tokenizer: <IMG_CONTEXT> is id {ids[0]}, the backbone's image_token_index is {self.image_token_id} "
                f"({backbone.source}); tokenizer and backbone config do not belong together"
            )
        self.pad_id = int(tokenizer.pad_token_id)
        self.codec = StateActionCodec.from_processor_kwargs(spec, kw, config, where)
        mc = spec.modality_configs
        self.video_keys = list(mc["video"].modality_keys)
        self.language_key = mc["language"].modality_keys[0]
        self.frames = len(mc["video"].delta_indices)
        self._prompts: OrderedDict[tuple[str, tuple[int, ...]], list[int]] = OrderedDict()
        self._lock = threading.Lock()  # the prompt cache and the fast tokenizer, across request threads

    # -- images ---------------------------------------------------------------------------------------------------
    def image(self, frame: np.ndarray) -> np.ndarray:
        """One raw uint8 (H, W, 3) frame -> the uint8 image the vision tower sees."""
        from PIL import Image

        img = self.transform(frame)
        h, w = eagle_image_size(img.shape[0], img.shape[1], self.factor)
        if (h, w) != img.shape[:2]:
            img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.Resampling.BICUBIC))
        return img

    def images(self, observations: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        out = []
        for obs in observations:
            videos = [obs["video"][k] for k in self.video_keys]
            for s in range(videos[0].shape[0] if videos else 0):
                for f in range(self.frames):
                    out.extend(self.image(v[s, f]) for v in videos)
        return out

    # -- text ------------------------------------------------------------------------------------------------------
    def prompt_ids(self, instruction: str, image_tokens: tuple[int, ...]) -> list[int]:
        key = (instruction, image_tokens)
        with self._lock:
            ids = self._prompts.get(key)
            if ids is not None:
                self._prompts.move_to_end(key)
                return ids
            text = formalize_language(instruction) if self.formalize else instruction
            n = len(image_tokens)
            if self.chat_template is None:
                chat = default_chat_text(text, n)
            else:
                content = [{"type": "text", "text": text}] + [{"type": "image"} for _ in range(n)]
                chat = render_chat(self.chat_template, [{"role": "user", "content": content}])

            def expand(m: re.Match) -> str:
                k = int(m.group(2))
                if m.group(1) != "image" or not 1 <= k <= n:
                    raise ValueError(f"chat template: unexpected placeholder {m.group(0)}")
                return f"<image {k}><img>{'<IMG_CONTEXT>' * image_tokens[k - 1]}</img>"

            ids = self.tokenizer(_PLACEHOLDER.sub(expand, chat), add_special_tokens=False)["input_ids"]
            self._prompts[key] = ids
            if len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
            return ids

    # -- the batch -------------------------------------------------------------------------------------------------
    def collate(self, observations: Sequence[Mapping[str, Any]], states: Mapping[str, np.ndarray], *,
                device: torch.device, dtype: torch.dtype, length_multiple: int = 1) -> dict[str, Any]:
        """Model inputs for every sample of ``observations`` (validated, nested form). The prompts are
        left-padded to the longest, rounded up to ``length_multiple`` (few shapes for compiled execution)."""
        frames = self.images(observations)
        per_sample = len(self.video_keys) * self.frames
        texts = [t for obs in observations for t in obs["language"][self.language_key]]
        prompts = [
            self.prompt_ids(t, tuple(f.shape[0] * f.shape[1] // self.pixels_per_token
                                     for f in frames[i * per_sample:(i + 1) * per_sample]))
            for i, t in enumerate(texts)
        ]
        length = -(-max(len(p) for p in prompts) // length_multiple) * length_multiple
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p):] = 1
        state = torch.from_numpy(self.codec.encode_states(states))
        return {
            "images": self._pixel_groups(frames, device, dtype),
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "state": state.to(device=device, dtype=dtype),
            "embodiment_id": int(self.spec.embodiment_id),
        }

    @staticmethod
    def _pixel_groups(frames: list[np.ndarray], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Runs of same-size images, in prompt order, as (N, 3, h, w) tensors in [-1, 1]."""
        groups: list[torch.Tensor] = []
        start = 0
        while start < len(frames):
            end = start
            while end < len(frames) and frames[end].shape == frames[start].shape:
                end += 1
            u8 = torch.from_numpy(np.stack(frames[start:end]))
            if device.type == "cuda":
                u8 = u8.pin_memory().to(device, non_blocking=True)
            x = (u8.permute(0, 3, 1, 2).float() - 127.5) / 127.5
            groups.append(x.to(dtype))
            start = end
        return groups

    @staticmethod
    def pad_rows(inputs: dict[str, Any], n: int, rows: int) -> dict[str, Any]:
        """``inputs`` of n samples grown to ``rows`` by repeating the last (fixed shapes for compiled execution);
        the extra images repeat the last one, as many as the repeated prompts have image slots."""
        out = dict(inputs)
        groups = list(inputs["images"])
        if groups:
            extra = sum(g.shape[0] for g in groups) // n * (rows - n)
            groups[-1] = pad_rows(groups[-1], groups[-1].shape[0] + extra)
        out["images"] = groups
        for k in ("input_ids", "attention_mask", "state", "noise", "update_weights"):
            if k in inputs:
                out[k] = pad_rows(inputs[k], rows)
        return out

    def model_image_size(self) -> tuple[int, int]:
        """(h, w) of the images the vision tower sees (for a square camera frame)."""
        return tuple(self.image(np.zeros((256, 256, 3), np.uint8)).shape[:2])

    def decode_actions(self, normalized: np.ndarray, states: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.codec.decode_actions(normalized, states)


__all__ = ["Gr00tN1d6Processor", "eagle_image_size"]
