"""The N1.6 model on its own (policy.modeling_gr00t_n1d6, policy.flow_matching): shapes, batch independence,
every input used, weight loading errors, config defaults and refusals. Parity with NVIDIA's numbers is in
tests/test_gr00t_n16_parity.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from policy import make_demo_checkpoint as mdc
from policy.configuration_gr00t_n1d6 import ConfigError, EagleBackboneConfig, Gr00tN1d6Config
from policy.modeling_gr00t_n1d6 import Gr00tN1d6, load_model

ATOL = 1e-5
VIEWS = 2
TOKENS_PER_IMAGE = 4  # tiny: 56 px, 14 px patches -> 4 x 4, unshuffled 2 x 2


@pytest.fixture(scope="module")
def tiny() -> Gr00tN1d6:
    return mdc.build_demo_model("tiny", seed=0)


def sample(model: Gr00tN1d6, seed: int, text_len: int, embodiment: int = 20) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg, image_id = model.config, model.backbone_config.image_token_index
    text = torch.randint(7, 200, (text_len,), generator=g)
    ids = torch.cat([text[: text_len // 2], torch.full((VIEWS * TOKENS_PER_IMAGE,), image_id), text[text_len // 2:]])
    return dict(images=torch.rand(VIEWS, 3, 56, 56, generator=g) * 2 - 1, ids=ids,
                state=torch.randn(1, cfg.max_state_dim, generator=g), embodiment=embodiment,
                noise=torch.randn(cfg.action_horizon, cfg.max_action_dim, generator=g))


def collate(samples: list[dict], pad_to: int = 0, pad_id: int = 0, per_sample_ids: bool = False) -> dict:
    """Left-pad the prompts (the processor's job, done by hand here)."""
    length = max(max(len(s["ids"]) for s in samples), pad_to)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, length - len(s["ids"]):] = s["ids"]
        mask[i, length - len(s["ids"]):] = 1
    embodiments = [s["embodiment"] for s in samples]
    return dict(images=[torch.cat([s["images"] for s in samples])], input_ids=ids, attention_mask=mask,
                state=torch.stack([s["state"] for s in samples]),
                embodiment_id=torch.tensor(embodiments) if per_sample_ids else embodiments[0],
                noise=torch.stack([s["noise"] for s in samples]))


def test_output_shape_dtype_and_the_head_moves_the_noise(tiny):
    batch = collate([sample(tiny, i, 5 + i) for i in range(3)])
    out = tiny.get_action(**batch)
    cfg = tiny.config
    assert out.shape == (3, cfg.action_horizon, cfg.max_action_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() < 100
    assert (out - batch["noise"]).abs().mean() > 1e-2


def test_same_seed_same_weights_and_repeatable_outputs(tiny):
    again, other = mdc.build_demo_model("tiny", seed=0), mdc.build_demo_model("tiny", seed=1)
    batch = collate([sample(tiny, 0, 6)])
    assert torch.equal(tiny.get_action(**batch), again.get_action(**batch))
    assert torch.equal(tiny.get_action(**batch), tiny.get_action(**batch))
    assert not torch.allclose(tiny.get_action(**batch), other.get_action(**batch))


def test_a_sample_alone_equals_it_left_padded_in_a_batch(tiny):
    samples = [sample(tiny, 100 + i, n) for i, n in enumerate((3, 12, 7, 1, 9))]
    batched = tiny.get_action(**collate(samples))
    for i, s in enumerate(samples):
        alone = tiny.get_action(**collate([s]))[0]
        torch.testing.assert_close(batched[i], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(tiny.get_action(**collate([s], pad_to=30))[0], alone, atol=ATOL, rtol=0)


def test_pad_token_ids_are_ignored(tiny):
    batch = collate([sample(tiny, 0, 4), sample(tiny, 1, 10)])
    garbage = dict(batch, input_ids=batch["input_ids"].clone())
    garbage["input_ids"][0, :6] = 99  # the left padding of sample 0
    torch.testing.assert_close(tiny.get_action(**garbage), tiny.get_action(**batch), atol=ATOL, rtol=0)


def test_per_sample_embodiment_rows_agree_with_the_one_embodiment_fast_path(tiny):
    samples = [sample(tiny, i, 6, embodiment=e) for i, e in enumerate((20, 8, 20))]
    mixed = tiny.get_action(**collate(samples, per_sample_ids=True))
    for i, s in enumerate(samples):
        torch.testing.assert_close(mixed[i], tiny.get_action(**collate([s]))[0], atol=ATOL, rtol=0)
    assert (mixed[0] - tiny.get_action(**collate([dict(samples[0], embodiment=8)]))[0]).abs().max() > 1e-3


@pytest.mark.parametrize("key", ["images", "input_ids", "state", "noise"])
def test_every_input_changes_the_output(tiny, key):
    batch = collate([sample(tiny, 0, 6)])
    other = dict(batch)
    if key == "images":
        other["images"] = [torch.rand_like(batch["images"][0]) * 2 - 1]
    elif key == "input_ids":
        other["input_ids"] = batch["input_ids"].clone()
        other["input_ids"][0, 1] += 1
    else:
        other[key] = torch.randn_like(batch[key])
    assert (tiny.get_action(**other) - tiny.get_action(**batch)).abs().max() > 1e-6


def test_bfloat16_runs_and_keeps_the_integration_in_float32(tiny):
    model = mdc.build_demo_model("tiny", seed=0, dtype=torch.bfloat16)
    batch = collate([sample(tiny, 0, 6), sample(tiny, 1, 2)])
    out = model.get_action(**batch)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - tiny.get_action(**batch)).abs().max() < 0.25


def test_image_slots_and_images_must_agree(tiny):
    batch = collate([sample(tiny, 0, 6)])
    with pytest.raises(ValueError, match="8 <IMG_CONTEXT> slots for 4 image tokens"):
        tiny.get_action(**dict(batch, images=[batch["images"][0][:1]]))


def test_plain_dit_cross_attends_to_every_valid_token(tiny):
    config = dataclasses.replace(tiny.config, use_alternate_vl_dit=False)
    model = Gr00tN1d6(config, tiny.backbone_config)
    model.load_state_dict(tiny.state_dict())
    samples = [sample(tiny, 3, 4), sample(tiny, 4, 11)]
    out = model.get_action(**collate(samples))
    assert (out - tiny.get_action(**collate(samples))).abs().max() > 1e-4  # other masks, other actions
    torch.testing.assert_close(out[0], model.get_action(**collate(samples[:1]))[0], atol=ATOL, rtol=0)


def test_loading_names_the_tensor_that_does_not_fit(tiny, tmp_path):
    tensors = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    tensors["backbone.model.language_model.lm_head.weight"] = torch.zeros(2, 2)  # unused by inference: skipped

    def load(t):
        save_file(t, str(tmp_path / "model.safetensors"))
        return load_model(tmp_path, tiny.config, tiny.backbone_config, dtype=torch.float32, device="cpu")

    assert load(tensors).action_head.vlln.weight.shape == tiny.action_head.vlln.weight.shape
    missing = {k: v for k, v in tensors.items() if k != "action_head.vlln.bias"}
    with pytest.raises(ValueError, match=r"1 parameter\(s\) missing, e.g. action_head.vlln.bias"):
        load(missing)
    with pytest.raises(ValueError, match=r"1 unexpected tensor\(s\), e.g. action_head.extra"):
        load(dict(tensors, **{"action_head.extra": torch.zeros(1)}))
    wrong = dict(tensors, **{"action_head.vlln.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"tensor action_head.vlln.bias has shape \(5,\), the model expects \(32,\)"):
        load(wrong)


def test_config_defaults_are_n16s_and_bad_values_name_the_field():
    cfg = Gr00tN1d6Config.from_checkpoint_dict({"model_type": "Gr00tN1d6"})
    assert (cfg.select_layer, cfg.backbone_embedding_dim, cfg.action_horizon) == (16, 2048, 16)
    assert (cfg.dit.num_layers, cfg.dit.inner_dim, cfg.dit.output_dim, cfg.dit.positional_embeddings) == (32, 1536, 1024, None)
    assert cfg.use_alternate_vl_dit and cfg.attend_text_every_n_blocks == 2 and cfg.num_inference_timesteps == 4
    with pytest.raises(ConfigError, match=r"config.json.action_horizon: expected int, got 'x'"):
        Gr00tN1d6Config.from_checkpoint_dict({"action_horizon": "x"})
    with pytest.raises(ConfigError, match="must equal input_embedding_dim 64"):
        Gr00tN1d6Config.from_checkpoint_dict({"input_embedding_dim": 64})
    with pytest.raises(ConfigError, match="model_type is 'Gr00tN1d7'"):
        Gr00tN1d6Config.from_checkpoint_dict({"model_type": "Gr00tN1d7"})
    # A DiT config that leaves positional_embeddings out gets the DiT class's default (sinusoidal)
    assert Gr00tN1d6Config.from_checkpoint_dict({"diffusion_model_cfg": {"num_layers": 2}}).dit.positional_embeddings == "sinusoidal"


def test_backbone_config_defaults_are_eagle_block2a_2b_and_unsupported_forms_are_refused():
    d = EagleBackboneConfig()
    assert (d.vision.hidden_size, d.vision.num_hidden_layers, d.vision.patch_size, d.text.num_hidden_layers) == (1152, 27, 14, 28)
    assert d.image_token_index == 151669 and d.unshuffle == 2
    with pytest.raises(ConfigError, match="use_rope / use_windows_attn are set"):
        EagleBackboneConfig.from_dict({"vision_config": {"use_windows_attn": True}}, "cfg.json")
    with pytest.raises(ConfigError, match="cfg.json text_config.hidden_size: expected int"):
        EagleBackboneConfig.from_dict({"text_config": {"hidden_size": "big"}}, "cfg.json")
    again = EagleBackboneConfig.from_dict(mdc.preset_config("tiny")[1].to_dict(), "tiny")
    assert again.vision == mdc.preset_config("tiny")[1].vision and again.text == mdc.preset_config("tiny")[1].text
