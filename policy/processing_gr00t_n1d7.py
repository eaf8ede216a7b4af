"""GR00T N1.7 vision-language inputs: raw observation batch -> the Qwen3-VL backbone's tensors.

Matches NVIDIA's N1.7 processor (`Gr00tN1d7Processor`, eval mode) as LeRobot 0.6.1's Apache-2.0 port runs it,
stage by stage:

1. frames: per camera, the last `len(video.delta_indices)` frames, ordered (timestep, view) within a sample;
   each goes through the N1.7 image recipe (optional letter-box, resize, centre crop, resize; OpenCV INTER_AREA).
2. Qwen3-VL image processor: smart resize to multiples of patch*merge, bicubic antialiased resize of the uint8
   image, (x - 255*mean) / (255*std), repeated to `temporal_patch_size` frames, patches in 2x2 merge-block order.
3. prompt: task string formalised (lower case, punctuation dropped), one user turn of the checkpoint's chat
   template (one image item per frame, then the text), each `<|image_pad|>` expanded to that image's merged-token
   count, tokenised, left padded with the tokenizer's pad token.
4. mRoPE position ids (t, h, w) over each sample's valid tokens; left-pad positions are 0.

The stateless pieces are plain functions over the whole batch. `Gr00tN17VLProcessor` holds the per-checkpoint
parts (tokenizer, compiled chat template, recipes) and caches the per-text work: a robot sends the same
instruction every step, so its tokens and position ids are computed once per (text, image grid).

Where NVIDIA's code and LeRobot's port differ we follow NVIDIA (the fixed-size resize when
`shortest_image_edge` is null), except for an empty task, which becomes "Perform the task." as in LeRobot (NVIDIA
would prompt with an empty string). NVIDIA's torchvision recipe (`use_albumentations: false`) is refused by name.

`Gr00tN1d7Processor` is the whole per-embodiment processor NativePolicy calls: these stages, plus state
normalisation and action decoding through the codec shared with N1.6 (policy.state_action).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TASK = "Perform the task."
IMAGE_PAD = "<|image_pad|>"
PREPROCESSOR_FILE = "preprocessor_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Distinct (instruction, image grid) pairs kept tokenised; a fleet repeats a few instructions many times.
_ENCODE_CACHE_SIZE = 1024


class N17InputError(ValueError):
    """An observation or a checkpoint file does not have what the N1.7 processor needs."""


# ----------------------------------------------------------------------------------------------------------------
# 1. The N1.7 image recipe (frames -> frames)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecipe:
    """NVIDIA's N1.7 eval image transform, as the checkpoint's processor_config.json sets it.

    With `shortest_image_edge` set, both resizes keep the aspect ratio (shortest edge -> that size); without it,
    both resize to exactly `image_target_size`. The crop keeps `crop_fraction` of each side, or
    `image_crop_size[0] / image_target_size[0]` when `crop_fraction` is null.
    """

    shortest_image_edge: int | None = 256
    crop_fraction: float | None = 0.95
    image_target_size: tuple[int, int] | None = None
    image_crop_size: tuple[int, int] | None = None
    letter_box: bool = False

    @classmethod
    def from_processor_kwargs(cls, kwargs: Mapping[str, Any]) -> "ImageRecipe":
        """From `processor_kwargs` of processor_config.json (NVIDIA's `Gr00tN1d7Processor` arguments)."""
        if not kwargs.get("use_albumentations", False):
            # NVIDIA's other recipe (torchvision bilinear on a fixed square) differs from LeRobot's port of it
            # (bicubic), and no N1.7 checkpoint we know uses it: refuse rather than guess which one is meant.
            raise N17InputError(
                "processor_config.json processor_kwargs.use_albumentations: expected true (the OpenCV INTER_AREA "
                f"recipe of NVIDIA's N1.7 checkpoints), got {kwargs.get('use_albumentations')!r}"
            )

        def pair(name: str) -> tuple[int, int] | None:
            value = kwargs.get(name)
            if value is None:
                return None
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise N17InputError(f"processor_kwargs.{name}: expected [height, width], got {value!r}")
            return int(value[0]), int(value[1])

        edge = kwargs.get("shortest_image_edge", 256)
        fraction = kwargs.get("crop_fraction", 0.95)
        recipe = cls(
            shortest_image_edge=None if edge is None else int(edge),
            crop_fraction=None if fraction is None else float(fraction),
            image_target_size=pair("image_target_size"),
            image_crop_size=pair("image_crop_size"),
            letter_box=bool(kwargs.get("letter_box_transform", False)),
        )
        recipe.validate()
        return recipe

    def validate(self) -> None:
        if self.shortest_image_edge is None and self.image_target_size is None:
            raise N17InputError("image recipe: shortest_image_edge and image_target_size are both null")
        if self.shortest_image_edge is not None and self.shortest_image_edge < 1:
            raise N17InputError(f"image recipe: shortest_image_edge must be >= 1, got {self.shortest_image_edge}")
        if self.crop_fraction is None and (self.image_crop_size is None or self.image_target_size is None):
            raise N17InputError(
                "image recipe: crop_fraction is null and image_crop_size/image_target_size are not both set"
            )
        fraction = self.fraction()
        if not 0.0 < fraction <= 1.0:
            raise N17InputError(f"image recipe: crop fraction must be in (0, 1], got {fraction}")

    def fraction(self) -> float:
        if self.crop_fraction is not None:
            return self.crop_fraction
        assert self.image_crop_size is not None and self.image_target_size is not None
        return self.image_crop_size[0] / self.image_target_size[0]


def _cv2():
    # OpenCV for INTER_AREA: its area-averaging weights and uint8 rounding are what NVIDIA's albumentations
    # recipe produces, and no torch/PIL resize reproduces them exactly (frames must match to the last bit).
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - opencv-python-headless is a dependency
        raise ImportError("GR00T N1.7's image recipe needs OpenCV: pip install opencv-python-headless") from exc
    return cv2


def letter_box(frame: np.ndarray) -> np.ndarray:
    """Zero-pad (H, W, C) to a square max(H, W), the image centred (the extra pixel of an odd pad at the end)."""
    h, w = frame.shape[:2]
    if h == w:
        return frame
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(frame, ((top, side - h - top), (left, side - w - left), (0, 0)))


def resize_shortest_edge(frame: np.ndarray, edge: int) -> np.ndarray:
    """Aspect-preserving INTER_AREA resize so min(H, W) == edge; each side round(side * scale) (Python round,
    as albumentations' SmallestMaxSize); unchanged when already there."""
    h, w = frame.shape[:2]
    shortest = min(h, w)
    if shortest == edge:
        return frame
    scale = edge / float(shortest)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return _cv2().resize(frame, size, interpolation=_cv2().INTER_AREA)


def resize_exact(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    return _cv2().resize(frame, (width, height), interpolation=_cv2().INTER_AREA)


def centre_crop_fraction(frame: np.ndarray, fraction: float) -> np.ndarray:
    """Keep floor(side * fraction) of each side at offset floor((side - crop) / 2)."""
    h, w = frame.shape[:2]
    ch, cw = max(1, int(h * fraction)), max(1, int(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return frame[top : top + ch, left : left + cw]


def apply_image_recipe(frame: np.ndarray, recipe: ImageRecipe) -> np.ndarray:
    """One (H, W, 3) uint8 frame through the N1.7 eval recipe: [letter-box], resize, centre crop, resize."""
    if recipe.letter_box:
        frame = letter_box(frame)
    if recipe.shortest_image_edge is not None:
        edge = recipe.shortest_image_edge

        def resize(x: np.ndarray) -> np.ndarray:
            return resize_shortest_edge(x, edge)
    else:
        # NVIDIA resizes to exactly image_target_size here (albumentations Resize). LeRobot 0.6.1 instead resizes
        # the shortest edge to image_target_size[0]; we follow NVIDIA, whose checkpoints these are.
        assert recipe.image_target_size is not None
        th, tw = recipe.image_target_size

        def resize(x: np.ndarray) -> np.ndarray:
            return resize_exact(x, th, tw)

    frame = resize(frame)
    frame = centre_crop_fraction(frame, recipe.fraction())
    return np.ascontiguousarray(resize(frame))


def _as_frames(video: Mapping[str, Any], views: Sequence[str], horizon: int) -> tuple[int, list[np.ndarray]]:
    """Check the cameras and return (B, [per view: (B, horizon, H, W, 3) uint8])."""
    if not views:
        raise N17InputError("video.modality_keys: expected at least one camera, got none")
    batch: int | None = None
    out = []
    for view in views:
        if view not in video:
            raise N17InputError(f"video.{view}: expected a camera of the checkpoint, missing (got {sorted(video)})")
        arr = np.asarray(video[view])
        if arr.dtype != np.uint8 or arr.ndim != 5 or arr.shape[-1] != 3:
            raise N17InputError(f"video.{view}: expected uint8 (B, T, H, W, 3), got {arr.dtype} {arr.shape}")
        if arr.shape[1] < horizon:
            raise N17InputError(f"video.{view}: expected at least {horizon} frames on axis 1, got {arr.shape[1]}")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise N17InputError(f"video.{view}: expected batch size {batch} like video.{views[0]}, got {arr.shape[0]}")
        out.append(arr[:, arr.shape[1] - horizon :])
    assert batch is not None
    return batch, out


def n17_frames(
    video: Mapping[str, Any], views: Sequence[str], recipe: ImageRecipe, horizon: int = 1
) -> list[list[np.ndarray]]:
    """Per sample, its images in prompt order (timestep-major, then view in `views` order), after the recipe.

    `video[view]` is uint8 (B, T, H, W, 3); the last `horizon` frames are used (N1.7 checkpoints: 1).
    """
    batch, per_view = _as_frames(video, views, horizon)
    return [
        [apply_image_recipe(per_view[v][b, t], recipe) for t in range(horizon) for v in range(len(views))]
        for b in range(batch)
    ]


# ----------------------------------------------------------------------------------------------------------------
# 2. Qwen3-VL image processor (frames -> pixel_values, image_grid_thw)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QwenImageSpec:
    """The Qwen2-VL/Qwen3-VL image processor settings of a tokenizer dir's preprocessor_config.json."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dir(cls, tokenizer_dir: str | Path) -> "QwenImageSpec":
        path = Path(tokenizer_dir) / PREPROCESSOR_FILE
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise N17InputError(f"{path}: missing (the Qwen3-VL image processor settings)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise N17InputError(f"{path}: cannot read ({exc})") from None
        return cls.from_json(cfg, where=str(path))

    @classmethod
    def from_json(cls, cfg: Mapping[str, Any], where: str = PREPROCESSOR_FILE) -> "QwenImageSpec":
        resample = cfg.get("resample", 3)
        if resample != 3:
            raise N17InputError(f"{where}: resample: expected 3 (bicubic, as Qwen3-VL), got {resample!r}")
        size = cfg.get("size") or {}
        min_pixels = cfg.get("min_pixels", size.get("shortest_edge", cls.min_pixels))
        max_pixels = cfg.get("max_pixels", size.get("longest_edge", cls.max_pixels))
        spec = cls(
            patch_size=int(cfg.get("patch_size", cls.patch_size)),
            merge_size=int(cfg.get("merge_size", cls.merge_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", cls.temporal_patch_size)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=tuple(float(x) for x in cfg.get("image_mean", cls.image_mean)),  # type: ignore[arg-type]
            image_std=tuple(float(x) for x in cfg.get("image_std", cls.image_std)),  # type: ignore[arg-type]
            rescale_factor=float(cfg.get("rescale_factor", cls.rescale_factor)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
        )
        if len(spec.image_mean) != 3 or len(spec.image_std) != 3:
            raise N17InputError(
                f"{where}: image_mean/image_std: expected 3 values each, got {spec.image_mean}, {spec.image_std}"
            )
        return spec

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: each side rounded to a multiple of `factor`, then scaled (floor/ceil to multiples)
    into [min_pixels, max_pixels] when the area leaves it. Python round (half to even), as upstream."""
    if max(height, width) / min(height, width) > 200:
        raise N17InputError(f"image {height}x{width}: aspect ratio must be at most 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _bicubic_uint8(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's `resize(uint8, BICUBIC, antialias=True)`: on CPU torch resizes uint8 natively (its own
    rounding; a float resize rounded afterwards differs by one level on some pixels), elsewhere in float32,
    clamped and rounded, exactly as torchvision does on each device."""
    if images.shape[-2:] == (height, width):
        return images
    if images.device.type == "cpu":
        return F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    out = F.interpolate(images.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(torch.uint8)


def _patchify(images: torch.Tensor, spec: QwenImageSpec) -> torch.Tensor:
    """(N, C, H, W) float -> (N * gh * gw, C * T * P * P), rows in merge-block order (block row, block col, inner
    row, inner col), the single frame repeated to T = temporal_patch_size."""
    n, c, h, w = images.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = images.reshape(n, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, bh, bw, ih, iw, c, p, p
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
    return x.reshape(n * gh * gw, c * t * p * p)


def qwen_image_inputs(images: Sequence[np.ndarray], spec: QwenImageSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (H, W, 3) uint8, in order -> (pixel_values float32 (sum of patches, C*T*P*P), image_grid_thw int64
    (N, 3)). Same-size images are resized in one call; the output keeps the input order."""
    if not images:
        raise N17InputError("images: expected at least one image, got none")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise N17InputError(f"image {i}: expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
        groups.setdefault(img.shape[:2], []).append(i)
    mean = torch.tensor(spec.image_mean, dtype=torch.float32)
    std = torch.tensor(spec.image_std, dtype=torch.float32)
    if spec.do_rescale and spec.do_normalize:
        # transformers fuses the two steps into one normalisation by 255*mean, 255*std; fusing the same way keeps
        # pixel_values bit-identical to it.
        mean, std = mean * (1.0 / spec.rescale_factor), std * (1.0 / spec.rescale_factor)
    patches: list[torch.Tensor | None] = [None] * len(images)
    grids: list[tuple[int, int, int] | None] = [None] * len(images)
    for (h, w), idx in groups.items():
        batch = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2)
        if spec.do_resize:
            th, tw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
            batch = _bicubic_uint8(batch, th, tw)
        elif h % spec.factor or w % spec.factor:
            raise N17InputError(f"image {h}x{w}: with do_resize false both sides must be multiples of {spec.factor}")
        x = batch.to(torch.float32)
        if spec.do_normalize:
            x = (x - mean[None, :, None, None]) / std[None, :, None, None]
        elif spec.do_rescale:
            x = x * spec.rescale_factor
        gh, gw = x.shape[-2] // spec.patch_size, x.shape[-1] // spec.patch_size
        rows = _patchify(x, spec).reshape(len(idx), gh * gw, -1)
        for j, i in enumerate(idx):
            patches[i] = rows[j]
            grids[i] = (1, gh, gw)
    return torch.cat(patches, dim=0), torch.tensor(grids, dtype=torch.int64)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# 3. Prompt: formalisation, chat template, image-pad expansion, tokens, left padding
# ----------------------------------------------------------------------------------------------------------------

_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")


def formalize_language(text: str) -> str:
    """Lower case, then drop every character that is neither a (Unicode) word character nor whitespace."""
    return _NOT_WORD_OR_SPACE.sub("", text.lower())


def task_text(raw: Any, formalize: bool) -> str:
    """The prompt text of one sample: an empty task becomes "Perform the task." (then formalised, as LeRobot)."""
    text = str(raw) if raw is not None else ""
    text = text or DEFAULT_TASK
    return formalize_language(text) if formalize else text


def language_batch(language: Mapping[str, Any], key: str, batch: int) -> list[str]:
    """One task string per sample from `language[key]`: [[str]] * B (the last string of each inner list is the
    current one), [str] * B, or a (B,) string array."""
    if key not in language:
        raise N17InputError(f"language.{key}: expected the task instruction, missing (got {sorted(language)})")
    value = language[key]
    items = value.tolist() if isinstance(value, np.ndarray) else value
    if isinstance(items, str) or not isinstance(items, Sequence) or len(items) != batch:
        got = len(items) if isinstance(items, Sequence) and not isinstance(items, str) else type(items).__name__
        raise N17InputError(f"language.{key}: expected {batch} entries (one per sample), got {got}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            item = item.tolist()
        if isinstance(item, (list, tuple)):
            if not item:
                raise N17InputError(f"language.{key}[{i}]: expected a list holding the task string, got []")
            item = item[-1]
        if item is not None and not isinstance(item, str):
            raise N17InputError(f"language.{key}[{i}]: expected a string, got {type(item).__name__}")
        out.append(item or "")
    return out


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(fmt)


def compile_chat_template(source: str):
    """The template as transformers compiles it: jinja2's ImmutableSandboxedEnvironment, trim_blocks and
    lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`. The sandbox is the point: the
    template comes with the checkpoint and must not reach Python."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def read_chat_template(tokenizer_dir: str | Path) -> str:
    """chat_template.jinja, else chat_template.json's "chat_template", else tokenizer_config.json's."""
    d = Path(tokenizer_dir)
    jinja_file = d / CHAT_TEMPLATE_FILES[0]
    if jinja_file.is_file():
        return jinja_file.read_text()
    for path in (d / CHAT_TEMPLATE_FILES[1], d / TOKENIZER_CONFIG_FILE):
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (OSError, json.JSONDecodeError) as exc:
                raise N17InputError(f"{path}: cannot read ({exc})") from None
            if isinstance(template, str):
                return template
    raise N17InputError(
        f"{d}: expected a chat template ({', '.join(CHAT_TEMPLATE_FILES)} or tokenizer_config.json's chat_template), "
        "found none"
    )


def render_prompt(template, n_images: int, text: str, special_tokens: Mapping[str, str] | None = None) -> str:
    """One user turn: `n_images` image items, then the text; no generation prompt (as N1.7)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return template.render(
        messages=messages, tools=None, documents=None, add_generation_prompt=False, **dict(special_tokens or {})
    )


def expand_image_pads(prompt: str, tokens_per_image: Sequence[int]) -> str:
    """Each `<|image_pad|>`, in order, becomes that image's count of merged-patch tokens."""
    pieces = prompt.split(IMAGE_PAD)
    if len(pieces) - 1 != len(tokens_per_image):
        raise N17InputError(
            f"chat template: expected {len(tokens_per_image)} {IMAGE_PAD} markers (one per image), "
            f"got {len(pieces) - 1}"
        )
    out = [pieces[0]]
    for n, piece in zip(tokens_per_image, pieces[1:]):
        out.append(IMAGE_PAD * int(n))
        out.append(piece)
    return "".join(out)


def left_pad(
    sequences: Sequence[np.ndarray], pad_value: int, length_multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-align int64 sequences in (B, L) filled with `pad_value`; mask 1 on real tokens, 0 on pads. L is the
    longest length rounded up to `length_multiple` (few shapes for compiled execution)."""
    length = -(-max(len(s) for s in sequences) // length_multiple) * length_multiple
    ids = np.full((len(sequences), length), pad_value, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, length - len(s) :] = s
            mask[i, length - len(s) :] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------
# 4. mRoPE position ids
# ----------------------------------------------------------------------------------------------------------------


def mrope_positions(ids: np.ndarray, grids: np.ndarray, image_token_id: int, merge_size: int) -> np.ndarray:
    """(3, n) int64 (t, h, w) positions of one sample's valid tokens `ids` (n,), its images' grids (k, 3).

    Text advances one index on all three axes. An image of (t, h/m, w/m) merged tokens starting at index s gets
    (s + ti, s + row, s + col); the text after it resumes at s + max(h, w) / m (Qwen3-VL: t stays at the image
    index for single images, whose grids have t = 1)."""
    n = len(ids)
    pos = np.empty((3, n), dtype=np.int64)
    is_image = ids == image_token_id
    cursor, i, k = 0, 0, 0
    while i < n:
        nxt = int(np.argmax(is_image[i:])) + i if is_image[i:].any() else n
        if nxt > i:  # text run
            pos[:, i:nxt] = np.arange(cursor, cursor + nxt - i)[None]
            cursor += nxt - i
            i = nxt
            continue
        if k >= len(grids):
            raise N17InputError(f"input_ids: more {IMAGE_PAD} tokens than images ({len(grids)})")
        t, h, w = (int(v) for v in grids[k])
        lh, lw = h // merge_size, w // merge_size
        count = t * lh * lw
        if i + count > n or not is_image[i : i + count].all():
            raise N17InputError(f"input_ids: image {k} expects {count} consecutive {IMAGE_PAD} tokens at {i}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        pos[0, i : i + count] = tt.reshape(-1) + cursor
        pos[1, i : i + count] = hh.reshape(-1) + cursor
        pos[2, i : i + count] = ww.reshape(-1) + cursor
        cursor += max(lh, lw)
        i += count
        k += 1
    if k != len(grids):
        raise N17InputError(f"input_ids: {k} images' tokens found, {len(grids)} images given")
    return pos


def batch_position_ids(per_sample: Sequence[np.ndarray], attention_mask: np.ndarray) -> np.ndarray:
    """Left-padded (3, B, L) from each sample's (3, n_valid); pads get 0 on every row (as transformers 5)."""
    b, length = attention_mask.shape
    out = np.zeros((3, b, length), dtype=np.int64)
    for i, pos in enumerate(per_sample):
        out[:, i, length - pos.shape[1] :] = pos
    return out


# ----------------------------------------------------------------------------------------------------------------
# The per-checkpoint processor
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class N17VLInputs:
    """What the Qwen3-VL backbone takes, for a batch of B samples with L tokens."""

    pixel_values: torch.Tensor  # (patches of all images, C*T*P*P) float32, sample-major then prompt order
    image_grid_thw: torch.Tensor  # (images, 3) int64
    input_ids: torch.Tensor  # (B, L) int64, left padded
    attention_mask: torch.Tensor  # (B, L) int64, 1 real token, 0 pad
    position_ids: torch.Tensor  # (3, B, L) int64 mRoPE (t, h, w); 0 at pads

    def to(self, device: torch.device | str) -> "N17VLInputs":
        return N17VLInputs(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class _Encoded:
    ids: np.ndarray  # (n,) int64
    positions: np.ndarray  # (3, n) int64


class Gr00tN17VLProcessor:
    """Raw observations of one embodiment -> `N17VLInputs`, using a checkpoint's tokenizer dir.

    `tokenizer_dir` holds tokenizer.json (+ tokenizer_config.json), the chat template and
    preprocessor_config.json (the checkpoint's `model_name` dir; no network is used).
    """

    def __init__(
        self,
        tokenizer_dir: str | Path,
        *,
        views: Sequence[str],
        language_key: str,
        recipe: ImageRecipe,
        video_horizon: int = 1,
        formalize: bool = True,
        cache_size: int = _ENCODE_CACHE_SIZE,
        tokenizer: Any = None,
    ):
        self.tokenizer_dir = Path(tokenizer_dir)
        self.views = tuple(views)
        self.language_key = language_key
        self.recipe = recipe
        self.video_horizon = int(video_horizon)
        self.formalize = formalize
        self.image_spec = QwenImageSpec.from_dir(self.tokenizer_dir)
        self.tokenizer = tokenizer if tokenizer is not None else load_n17_tokenizer(self.tokenizer_dir)
        self.template = compile_chat_template(read_chat_template(self.tokenizer_dir))
        self.special_tokens = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.image_token_id = _token_id(self.tokenizer, IMAGE_PAD)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise N17InputError(f"{self.tokenizer_dir / TOKENIZER_CONFIG_FILE}: pad_token: expected one, got none")
        self._cache: OrderedDict[tuple[str, tuple[tuple[int, int, int], ...]], _Encoded] = OrderedDict()
        self._cache_size = cache_size
        # A fast tokenizer refuses concurrent calls ("Already borrowed") and the cache is shared: replicas may
        # process batches from several threads, so encoding is serialised (a cache hit holds it for microseconds).
        self._lock = threading.Lock()

    @classmethod
    def from_processor_config(
        cls, tokenizer_dir: str | Path, processor_kwargs: Mapping[str, Any], embodiment_tag: str, **kw: Any
    ) -> "Gr00tN17VLProcessor":
        """From processor_config.json's `processor_kwargs` and one embodiment tag of its `modality_configs`."""
        configs = processor_kwargs.get("modality_configs") or {}
        if embodiment_tag not in configs:
            raise N17InputError(
                f"processor_kwargs.modality_configs: expected embodiment {embodiment_tag!r}, got {sorted(configs)}"
            )
        cfg = configs[embodiment_tag]
        video = cfg.get("video") or {}
        language = cfg.get("language") or {}
        lang_keys = language.get("modality_keys") or []
        if not lang_keys:
            raise N17InputError(f"modality_configs.{embodiment_tag}.language.modality_keys: expected one key, got none")
        return cls(
            tokenizer_dir,
            views=list(video.get("modality_keys") or []),
            language_key=lang_keys[0],  # further keys are training-time paraphrases
            recipe=ImageRecipe.from_processor_kwargs(processor_kwargs),
            video_horizon=len(video.get("delta_indices") or [0]),
            formalize=bool(processor_kwargs.get("formalize_language", True)),
            **kw,
        )

    # -- stages, exposed for tests and for callers that hold frames already --------------------------------------

    def frames(self, video: Mapping[str, Any]) -> list[list[np.ndarray]]:
        return n17_frames(video, self.views, self.recipe, self.video_horizon)

    def texts(self, language: Mapping[str, Any], batch: int) -> list[str]:
        return [task_text(t, self.formalize) for t in language_batch(language, self.language_key, batch)]

    def prompt(self, n_images: int, text: str) -> str:
        return render_prompt(self.template, n_images, text, self.special_tokens)

    def encode(self, text: str, grids: np.ndarray) -> _Encoded:
        """Token ids and mRoPE positions of one sample; cached per (text, image grids)."""
        key = (text, tuple(tuple(int(v) for v in g) for g in grids))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            merge = self.image_spec.merge_size
            counts = [int(np.prod(g)) // (merge * merge) for g in grids]
            expanded = expand_image_pads(self.prompt(len(grids), text), counts)
            ids = np.asarray(self.tokenizer(expanded, add_special_tokens=False)["input_ids"], dtype=np.int64)
            enc = _Encoded(ids, mrope_positions(ids, np.asarray(grids), self.image_token_id, merge))
            self._cache[key] = enc
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return enc

    def __call__(self, observation: Mapping[str, Any]) -> N17VLInputs:
        """`observation` in the nested form: {"video": {cam: uint8 (B, T, H, W, 3)}, "language": {key: [[str]] * B},
        ...}; other modalities are ignored here."""
        video = observation.get("video")
        language = observation.get("language")
        if not isinstance(video, Mapping):
            raise N17InputError(
                f"video: expected a mapping camera -> uint8 (B, T, H, W, 3), got {type(video).__name__}"
            )
        if not isinstance(language, Mapping):
            raise N17InputError(f"language: expected a mapping key -> [[str]] * B, got {type(language).__name__}")
        per_sample = self.frames(video)
        return self.from_frames(per_sample, self.texts(language, len(per_sample)))

    def from_frames(
        self, per_sample: Sequence[Sequence[np.ndarray]], texts: Sequence[str], length_multiple: int = 1
    ) -> N17VLInputs:
        """The batch from recipe-processed frames (per sample, in prompt order) and prompt texts; the prompts are
        left padded to the longest, rounded up to `length_multiple`."""
        if len(per_sample) != len(texts):
            raise N17InputError(f"texts: expected {len(per_sample)} (one per sample), got {len(texts)}")
        flat = [img for images in per_sample for img in images]
        pixel_values, grids = qwen_image_inputs(flat, self.image_spec)
        encoded, start = [], 0
        for images, text in zip(per_sample, texts):
            encoded.append(self.encode(text, grids[start : start + len(images)].numpy()))
            start += len(images)
        ids, mask = left_pad([e.ids for e in encoded], self.pad_token_id, length_multiple)
        positions = batch_position_ids([e.positions for e in encoded], mask)
        return N17VLInputs(
            pixel_values=pixel_values,
            image_grid_thw=grids,
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        )


def _token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        raise N17InputError(f"tokenizer: expected the special token {token}, not in its vocabulary")
    return int(tid)


def load_n17_tokenizer(tokenizer_dir: str | Path):
    """The tokenizer of a Qwen3-VL tokenizer dir (tokenizer.json), offline."""
    from transformers import PreTrainedTokenizerFast

    d = Path(tokenizer_dir)
    if not (d / "tokenizer.json").is_file():
        raise N17InputError(f"{d / 'tokenizer.json'}: missing (the N1.7 backbone's tokenizer)")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - name the dir whatever the tokenizer library raised
        raise N17InputError(f"{d}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------------------------
# The whole pre- and post-processing of one embodiment (what NativePolicy calls)
# ----------------------------------------------------------------------------------------------------------------

# NVIDIA's Gr00tN1d7Processor defaults, for keys a processor_config.json leaves out.
PROCESSOR_DEFAULTS: dict[str, Any] = {
    "use_percentiles": False,
    "clip_outliers": True,
    "apply_sincos_state_encoding": False,
    "use_relative_action": False,
    "exclude_state": False,
    "use_mean_std": False,
    "max_action_horizon": 50,
}


class Gr00tN1d7Processor:
    """One embodiment's N1.7 pre- and post-processing for a loaded `Gr00tN1d7`: observations -> model inputs
    (`collate`), normalised actions -> physical ones (`decode_actions`).

    The vision-language part is `Gr00tN17VLProcessor`; states and actions go through the codec shared with N1.6
    (policy.state_action), switched by processor_config.json as NVIDIA's N1.7 processor reads it:
    `use_percentiles` (q01/q99 instead of min/max), `clip_outliers`, `apply_sincos_state_encoding` (with the
    state config's `sin_cos_embedding_keys`), per-key `mean_std_embedding_keys`, `use_relative_action` (RELATIVE
    keys decoded with the per-step `relative_action` min/max and added to the current state), `exclude_state`
    (the state token sees zeros, as NVIDIA's processor feeds it), `max_action_horizon` (>= the embodiment's
    action steps). The state history (`state_history_length` steps of config.json, = the state config's delta
    indices) is flattened into one token. Refused: `use_mean_std: true` (see `_check_kwargs`).
    """

    def __init__(
        self,
        spec: Any,
        processor_kwargs: Mapping[str, Any],
        config: Any,
        tokenizer_dir: str | Path,
        *,
        tokenizer: Any = None,
        image_token_id: int | None = None,
        where: str = "processor_config.json",
    ):
        from .state_action import StateActionCodec

        kw = {**PROCESSOR_DEFAULTS, **dict(processor_kwargs)}
        self.spec = spec
        self.config = config
        mc = spec.modality_configs
        self._check_kwargs(kw, config, where)
        self.state_history = len(mc["state"].delta_indices)
        if self.state_history != config.state_history_length:
            raise N17InputError(
                f"{where}: embodiment {spec.tag!r} reads {self.state_history} state steps (state.delta_indices), "
                f"config.json state_history_length is {config.state_history_length}"
            )
        steps = len(mc["action"].delta_indices)
        if steps > int(kw["max_action_horizon"]):
            raise N17InputError(
                f"{where}: embodiment {spec.tag!r} asks for {steps} action steps (action.delta_indices), more than "
                f"max_action_horizon {kw['max_action_horizon']}"
            )
        self.exclude_state = bool(kw["exclude_state"]) or bool(mc["state"].extra.get("exclude_state", False))
        self.codec = StateActionCodec.from_processor_kwargs(spec, kw, config, where)
        self.vl = Gr00tN17VLProcessor.from_processor_config(tokenizer_dir, kw, spec.tag, tokenizer=tokenizer)
        if image_token_id is not None and self.vl.image_token_id != int(image_token_id):
            raise N17InputError(
                f"tokenizer {tokenizer_dir}: {IMAGE_PAD} is id {self.vl.image_token_id}, the backbone config's "
                f"image_token_id is {image_token_id}; tokenizer and backbone config do not belong together"
            )
        self.embodiment_id = int(spec.embodiment_id)

    @staticmethod
    def _check_kwargs(kw: Mapping[str, Any], config: Any, where: str) -> None:
        if kw["use_mean_std"]:
            # NVIDIA's N1.7 processor stores this switch, but its state/action normaliser reads only the per-key
            # mean_std_embedding_keys; what a global switch should do is not pinned down by any reference we have.
            raise N17InputError(
                f"{where}: processor_kwargs.use_mean_std is true; the native backend normalises with mean/std only the "
                "keys a modality config lists in mean_std_embedding_keys (as NVIDIA's N1.7 state/action processor "
                "does): list them there and set use_mean_std to false"
            )
        for name in ("max_state_dim", "max_action_dim"):
            if name in kw and int(kw[name]) != getattr(config, name):
                raise N17InputError(
                    f"{where}: processor_kwargs.{name} is {kw[name]}, config.json {name} is {getattr(config, name)}"
                )

    def encode_states(self, states: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """Raw {key: (N, T, D)} -> float32 (N, 1, T * max_state_dim): normalised, padded, the history flattened."""
        if self.exclude_state:
            return np.zeros((n, 1, self.config.state_input_dim), dtype=np.float32)
        enc = self.codec.encode_states(states)
        return np.ascontiguousarray(enc.reshape(enc.shape[0], 1, -1))

    def collate(
        self,
        observations: Sequence[Mapping[str, Any]],
        states: Mapping[str, np.ndarray],
        *,
        device: torch.device,
        dtype: torch.dtype,
        length_multiple: int = 1,
    ) -> dict[str, Any]:
        """Model inputs for every sample of ``observations`` (validated, nested form), in order."""
        per_sample: list[list[np.ndarray]] = []
        texts: list[str] = []
        for obs in observations:
            frames = self.vl.frames(obs["video"])
            per_sample.extend(frames)
            texts.extend(self.vl.texts(obs["language"], len(frames)))
        x = self.vl.from_frames(per_sample, texts, length_multiple)
        state = torch.from_numpy(self.encode_states(states, len(per_sample)))
        return {
            "pixel_values": x.pixel_values.to(device=device, dtype=dtype),
            "image_grid_thw": x.image_grid_thw.to(device),
            "input_ids": x.input_ids.to(device),
            "attention_mask": x.attention_mask.to(device),
            "position_ids": x.position_ids.to(device),
            "state": state.to(device=device, dtype=dtype),
            "embodiment_id": self.embodiment_id,
        }

    @staticmethod
    def pad_rows(inputs: dict[str, Any], n: int, rows: int) -> dict[str, Any]:
        """``inputs`` of n samples grown to ``rows`` by repeating the last sample (its images, prompt, state and
        noise): fixed shapes for compiled execution."""
        from .hot_path import pad_rows

        if rows == n:
            return inputs
        out = dict(inputs)
        grids = inputs["image_grid_thw"]
        per_sample = grids.shape[0] // n
        last = grids[grids.shape[0] - per_sample :]
        patches = int(last.prod(dim=1).sum())
        extra = rows - n
        pixels = inputs["pixel_values"]
        out["pixel_values"] = torch.cat([pixels, pixels[pixels.shape[0] - patches :].repeat(extra, 1)], dim=0)
        out["image_grid_thw"] = torch.cat([grids, last.repeat(extra, 1)], dim=0)
        out["position_ids"] = pad_rows(inputs["position_ids"].transpose(0, 1), rows).transpose(0, 1)
        for k in ("input_ids", "attention_mask", "state", "noise", "update_weights"):
            if k in inputs:
                out[k] = pad_rows(inputs[k], rows)
        return out

    def model_image_size(self) -> tuple[int, int]:
        """(h, w) of the images the vision tower sees for a square camera frame (the N1.7 recipe, then Qwen's
        resize to multiples of patch x merge)."""
        frame = apply_image_recipe(np.zeros((256, 256, 3), np.uint8), self.vl.recipe)
        s = self.vl.image_spec
        return smart_resize(frame.shape[0], frame.shape[1], s.factor, s.min_pixels, s.max_pixels)

    def decode_actions(self, normalized: np.ndarray, states: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """(N, action_horizon, max_action_dim) normalised -> {key: (N, len(action.delta_indices), D)} physical."""
        return self.codec.decode_actions(normalized, states)
