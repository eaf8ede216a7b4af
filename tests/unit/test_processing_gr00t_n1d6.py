"""N1.6 pre-processing on its own: GR00T's image transform (both recipes), Eagle's resize, the prompt and its
cache, the batch's left padding. NVIDIA's own numbers are checked in tests/test_gr00t_n16_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy import load_policy
from policy.image_transforms import Gr00tImageTransform, center_crop, letterbox, resize_shorter_side
from policy.make_demo_checkpoint import CHAT_TEMPLATE
from policy.processing_gr00t_n1d6 import PROMPT_CACHE_SIZE, default_chat_text, eagle_image_size
from policy.tokenization import formalize_language, render_chat

ALBUMENTATIONS = {"use_albumentations": True, "shortest_image_edge": 256, "crop_fraction": 0.95,
                  "image_target_size": None, "image_crop_size": None}


def test_letterbox_centres_with_the_smaller_half_on_top():
    img = np.full((3, 6, 3), 9, np.uint8)
    out = letterbox(img)
    assert out.shape == (6, 6, 3)
    assert (out[:1] == 0).all() and (out[1:4] == 9).all() and (out[4:] == 0).all()  # pad 3: 1 on top, 2 below
    assert letterbox(out) is out


def test_albumentations_recipe_gives_a_square_of_the_shorter_side():
    t = Gr00tImageTransform.from_processor_kwargs(ALBUMENTATIONS, letter_box_default=True)
    for h, w in ((239, 320), (200, 150), (480, 640), (256, 256), (40, 40)):
        assert t(np.zeros((h, w, 3), np.uint8)).shape == (256, 256, 3)
    assert resize_shorter_side(np.zeros((100, 151, 3), np.uint8), 50).shape == (50, 76, 3)  # 75.5 rounds to even


def test_fallbacks_and_the_torchvision_recipe():
    kw = dict(ALBUMENTATIONS, shortest_image_edge=None, crop_fraction=None, image_target_size=[64, 64],
              image_crop_size=[60, 60])
    t = Gr00tImageTransform.from_processor_kwargs(kw, letter_box_default=True)
    assert (t.shorter_side, t.crop_fraction) == (64, 60 / 64)
    tv = Gr00tImageTransform.from_processor_kwargs(dict(kw, use_albumentations=False), letter_box_default=True)
    img = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    assert tv(img).shape == (64, 64, 3) and tv(img).dtype == np.uint8
    assert center_crop(np.zeros((64, 64, 3)), (60, 60)).shape == (60, 60, 3)
    with pytest.raises(ValueError, match="shortest_image_edge and image_target_size are both null"):
        Gr00tImageTransform.from_processor_kwargs(dict(kw, image_target_size=None), letter_box_default=True)
    with pytest.raises(ValueError, match="use_albumentations is false, which needs image_target_size"):
        Gr00tImageTransform.from_processor_kwargs({"use_albumentations": False}, letter_box_default=True)


def test_eagle_resize_rounds_each_side_to_a_multiple_of_28_within_the_pixel_bounds():
    assert eagle_image_size(256, 256) == (252, 252) and eagle_image_size(56, 56) == (56, 56)
    assert eagle_image_size(238, 238) == (224, 224) and eagle_image_size(266, 266) == (280, 280)  # 8.5 -> 8, 9.5 -> 10
    assert eagle_image_size(20, 20) == (56, 56)  # below 4 x 28 x 28 pixels: scaled up
    h, w = eagle_image_size(3000, 3000)
    assert h * w <= 4096 * 28 * 28 and h % 28 == 0
    with pytest.raises(ValueError, match="aspect ratio"):
        eagle_image_size(10, 3000)


def test_language_is_formalised_unicode_aware_and_the_template_puts_text_before_images():
    assert formalize_language("Place the Cube, then push it LEFT (slowly).") == "place the cube then push it left slowly"
    assert formalize_language("Größe  ändern_jetzt!") == "größe  ändern_jetzt"  # whitespace kept, _ is a word char
    for n in (0, 1, 3):
        content = [{"type": "text", "text": "pick"}] + [{"type": "image"}] * n
        assert render_chat(CHAT_TEMPLATE, [{"role": "user", "content": content}]) == default_chat_text("pick", n)
    assert default_chat_text("pick", 2).endswith("user\npick<image-1><image-2><|im_end|>\n")


@pytest.fixture(scope="module")
def g1(tiny_checkpoint):
    return load_policy(tiny_checkpoint, "unitree_g1", warmup=False)


def test_prompts_are_left_padded_and_hold_one_slot_per_image_token(g1):
    p = g1.processor
    obs = g1.dummy_observation(2)
    obs["language"] = {k: ["pick the pear", "put the red cube in the bowl then close the drawer"] for k in obs["language"]}
    batch = p.collate([obs], obs["state"], device=torch.device("cpu"), dtype=torch.float32)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    short = int(mask[0].sum())
    assert short < ids.shape[1] and (mask[0, : ids.shape[1] - short] == 0).all() and mask[1].all()
    assert (ids[0, : ids.shape[1] - short] == p.pad_id).all()
    image_id = p.image_token_id
    assert ((ids == image_id).sum(1) == 2 * 4).all()  # 2 cameras x (56 px -> 4 tokens)
    assert batch["images"][0].shape == (4, 3, 56, 56) and batch["images"][0].abs().max() <= 1.0
    padded = p.collate([obs], obs["state"], device=torch.device("cpu"), dtype=torch.float32, length_multiple=64)
    assert padded["input_ids"].shape[1] % 64 == 0 and torch.equal(padded["input_ids"][:, -ids.shape[1]:], ids)


def test_the_prompt_cache_is_bounded_and_returns_the_same_ids(g1):
    p = g1.processor
    first = p.prompt_ids("pick the pear", (4, 4))
    assert p.prompt_ids("pick the pear", (4, 4)) is first
    for i in range(PROMPT_CACHE_SIZE + 5):
        p.prompt_ids(f"task {i}", (4, 4))
    assert len(p._prompts) == PROMPT_CACHE_SIZE and p.prompt_ids("pick the pear", (4, 4)) == first
