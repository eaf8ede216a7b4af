"""GR00T's evaluation image transform, per camera frame, on uint8 HWC RGB arrays.

NVIDIA builds it from the processor's image settings in one of two ways:

* ``use_albumentations`` (what released N1.6 checkpoints use): optional letterbox to a square (zero bars,
  top/left get the smaller half), resize so the shorter side is ``shortest_image_edge`` (OpenCV INTER_AREA,
  sides rounded half-to-even, skipped when already there), centre crop of ``int(side * crop_fraction)`` per side
  at ``(side - crop) // 2``, the same shorter-side resize again. ``shortest_image_edge`` / ``crop_fraction``
  fall back to ``image_target_size[0]`` / ``image_crop_size[0] / image_target_size[0]``.
* torchvision (``use_albumentations: false``): letterbox, resize to ``image_target_size`` (bilinear,
  antialiased, on uint8), centre crop to ``image_crop_size``, resize to ``image_target_size`` again.

OpenCV is used for INTER_AREA because nothing else reproduces its area weights bit for bit, and the backbone
sees every pixel: one grey level off moves the actions by more than our 1e-4 parity bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np


def letterbox(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if h == w:
        return img
    s = max(h, w)
    out = np.zeros((s, s) + img.shape[2:], dtype=img.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def resize_shorter_side(img: np.ndarray, size: int) -> np.ndarray:
    """albumentations ``SmallestMaxSize(size, INTER_AREA)``."""
    import cv2

    h, w = img.shape[:2]
    scale = size / float(min(h, w))
    if scale == 1.0:
        return img
    nh, nw = round(h * scale), round(w * scale)
    return cv2.resize(np.ascontiguousarray(img), (nw, nh), interpolation=cv2.INTER_AREA)


def center_crop_fraction(img: np.ndarray, fraction: float) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = max(1, int(h * fraction)), max(1, int(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[top : top + ch, left : left + cw]


def _size_pair(size: Any) -> tuple[int, int] | int:
    if isinstance(size, int):
        return size
    return int(size[0]), int(size[1])


def resize_bilinear_aa(img: np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
    """torchvision ``Resize(size)`` on a uint8 image (bilinear, antialiased; an int resizes the shorter side)."""
    import torch
    import torch.nn.functional as F

    h, w = img.shape[:2]
    if isinstance(size, int):
        if h <= w:
            oh, ow = size, int(size * w / h)
        else:
            oh, ow = int(size * h / w), size
    else:
        oh, ow = size
    if (oh, ow) == (h, w):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def center_crop(img: np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
    """torchvision ``CenterCrop(size)`` (the image is at least ``size``: GR00T resizes first)."""
    h, w = img.shape[:2]
    ch, cw = (size, size) if isinstance(size, int) else size
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return img[top : top + ch, left : left + cw]


@dataclass(frozen=True)
class Gr00tImageTransform:
    use_albumentations: bool
    letter_box: bool
    shorter_side: int | None = None
    crop_fraction: float | None = None
    target_size: tuple[int, int] | int | None = None
    crop_size: tuple[int, int] | int | None = None

    @classmethod
    def from_processor_kwargs(cls, kw: Mapping[str, Any], *, letter_box_default: bool,
                              where: str = "processor_config.json") -> "Gr00tImageTransform":
        target, crop = kw.get("image_target_size"), kw.get("image_crop_size")
        letter_box = bool(kw.get("letter_box_transform", letter_box_default))
        if kw.get("use_albumentations", False):
            edge, fraction = kw.get("shortest_image_edge"), kw.get("crop_fraction")
            if edge is None:
                if not target:
                    raise ValueError(f"{where}: shortest_image_edge and image_target_size are both null")
                edge = int(target[0])
            if fraction is None:
                if not target or not crop:
                    raise ValueError(f"{where}: crop_fraction and image_crop_size/image_target_size are all null")
                fraction = crop[0] / target[0]
            if not 0.0 < float(fraction) <= 1.0:
                raise ValueError(f"{where}: crop_fraction must be in (0, 1], got {fraction}")
            return cls(True, letter_box, shorter_side=int(edge), crop_fraction=float(fraction))
        if not target or not crop:
            raise ValueError(f"{where}: use_albumentations is false, which needs image_target_size and image_crop_size")
        return cls(False, letter_box, target_size=_size_pair(target), crop_size=_size_pair(crop))

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if self.letter_box:
            img = letterbox(img)
        if self.use_albumentations:
            img = resize_shorter_side(img, self.shorter_side)
            img = center_crop_fraction(img, self.crop_fraction)
            return resize_shorter_side(img, self.shorter_side)
        img = resize_bilinear_aa(img, self.target_size)
        img = center_crop(img, self.crop_size)
        return resize_bilinear_aa(img, self.target_size)


def batch_frames(videos: Sequence[np.ndarray], transform) -> list[np.ndarray]:
    """Apply ``transform`` to every frame of (B, T, H, W, 3) arrays; frames of sample-major, then frame, then
    the order ``videos`` lists the cameras in."""
    out = []
    b, t = videos[0].shape[:2]
    for s in range(b):
        for f in range(t):
            for v in videos:
                out.append(transform(v[s, f]))
    return out


__all__ = ["Gr00tImageTransform", "batch_frames", "center_crop", "center_crop_fraction", "letterbox",
           "resize_bilinear_aa", "resize_shorter_side"]
