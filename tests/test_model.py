"""Tests of the native GR00T N1.6-shaped model (policy.configuration / policy.modeling)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from policy.configuration import FleetGr00tConfig
from policy.modeling import FleetGr00tModel

ATOL = 1e-5


def build(preset: str = "tiny", seed: int = 0, **overrides) -> FleetGr00tModel:
    torch.manual_seed(seed)
    return FleetGr00tModel(FleetGr00tConfig.from_preset(preset, **overrides)).eval()


def make_sample(cfg: FleetGr00tConfig, seed: int, text_len: int, views: int = 2, embodiment: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    return dict(
        pixel_values=torch.rand(views, 3, s, s, generator=g) * 2 - 1,
        input_ids=torch.randint(1, cfg.vocab_size, (text_len,), generator=g),
        state=torch.randn(1, cfg.max_state_dim, generator=g),
        embodiment_id=embodiment,
        noise=torch.randn(cfg.action_horizon, cfg.max_action_dim, generator=g),
    )


def collate(samples, pad_to: int | None = None, pad_id: int = 0):
    """Right-pad the text of several samples into one batch (the processor's job, reimplemented here)."""
    length = max(len(s["input_ids"]) for s in samples)
    length = max(length, pad_to or 0)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = s["input_ids"]
        mask[i, :n] = 1
    return dict(
        pixel_values=torch.stack([s["pixel_values"] for s in samples]),
        input_ids=ids,
        attention_mask=mask,
        state=torch.stack([s["state"] for s in samples]),
        embodiment_id=torch.tensor([s["embodiment_id"] for s in samples], dtype=torch.long),
        noise=torch.stack([s["noise"] for s in samples]),
    )


@pytest.fixture(scope="module")
def tiny():
    return build("tiny")


# ------------------------------------------------------------------------------------------------------------------
# shapes, dtype, determinism
# ------------------------------------------------------------------------------------------------------------------


def test_output_shape_dtype_finite(tiny):
    cfg = tiny.config
    batch = collate([make_sample(cfg, i, 5 + i, embodiment=i) for i in range(3)])
    out = tiny.get_action(**batch)
    assert out.shape == (3, cfg.action_horizon, cfg.max_action_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max() < 100  # O(1)
    # the head really moves the noise (random weights, but non-trivial velocities)
    assert (out - batch["noise"]).abs().mean() > 1e-3


def test_backbone_shapes(tiny):
    cfg = tiny.config
    batch = collate([make_sample(cfg, 0, 4), make_sample(cfg, 1, 9)])
    with torch.inference_mode():
        feats, mask = tiny.encode_backbone(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    s = 2 * cfg.num_image_tokens + 9
    assert feats.shape == (2, s, cfg.backbone_embedding_dim)
    assert mask.shape == (2, s) and mask.dtype == torch.bool
    assert mask[0].sum() == 2 * cfg.num_image_tokens + 4 and mask[1].all()


def test_determinism():
    a, b, c = build(seed=0), build(seed=0), build(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    batch = collate([make_sample(a.config, 0, 6)])
    assert torch.equal(a.get_action(**batch), b.get_action(**batch))
    assert not torch.allclose(a.get_action(**batch), c.get_action(**batch))
    # repeated calls are deterministic too
    assert torch.equal(a.get_action(**batch), a.get_action(**batch))


# ------------------------------------------------------------------------------------------------------------------
# batch independence
# ------------------------------------------------------------------------------------------------------------------


def test_batch_independence(tiny):
    cfg = tiny.config
    lengths = [3, 12, 7, 1, 9]
    embodiments = [0, 5, 31, 5, 2]
    samples = [make_sample(cfg, 100 + i, n, embodiment=e) for i, (n, e) in enumerate(zip(lengths, embodiments))]
    batched = tiny.get_action(**collate(samples))
    for i, s in enumerate(samples):
        alone = tiny.get_action(**collate([s]))[0]
        torch.testing.assert_close(batched[i], alone, atol=ATOL, rtol=0)
        # alone but with extra right padding
        padded = tiny.get_action(**collate([s], pad_to=20))[0]
        torch.testing.assert_close(padded, alone, atol=ATOL, rtol=0)


def test_batch_independence_16_small_widths():
    model = build("tiny", seed=3, interleave_self_attention=False)  # every block: self + cross attention
    cfg = model.config
    samples = [make_sample(cfg, 200 + i, 1 + (7 * i) % 15, views=1, embodiment=i % 7) for i in range(16)]
    batched = model.get_action(**collate(samples))
    for i in (0, 5, 15):
        alone = model.get_action(**collate([samples[i]]))[0]
        torch.testing.assert_close(batched[i], alone, atol=ATOL, rtol=0)


def test_padded_token_ids_are_ignored(tiny):
    cfg = tiny.config
    batch = collate([make_sample(cfg, 0, 4), make_sample(cfg, 1, 10)])
    out = tiny.get_action(**batch)
    other = dict(batch)
    other["input_ids"] = batch["input_ids"].clone()
    other["input_ids"][0, 4:] = 7  # garbage in the padded positions of sample 0
    torch.testing.assert_close(tiny.get_action(**other), out, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# every input is used
# ------------------------------------------------------------------------------------------------------------------


def _changed(model, batch, key, value):
    other = dict(batch)
    other[key] = value
    return (model.get_action(**other) - model.get_action(**batch)).abs().max().item()


def test_inputs_change_output(tiny):
    cfg = tiny.config
    batch = collate([make_sample(cfg, 0, 6, embodiment=1)])
    assert _changed(tiny, batch, "embodiment_id", torch.tensor([2])) > 1e-3
    assert _changed(tiny, batch, "noise", torch.randn_like(batch["noise"])) > 1e-1
    assert _changed(tiny, batch, "state", torch.randn_like(batch["state"])) > 1e-5
    assert _changed(tiny, batch, "pixel_values", torch.rand_like(batch["pixel_values"]) * 2 - 1) > 1e-5
    ids = batch["input_ids"].clone()
    ids[0, 2] = (ids[0, 2] + 1) % cfg.vocab_size
    assert _changed(tiny, batch, "input_ids", ids) > 1e-6


def test_embodiments_in_one_batch_use_their_own_weights(tiny):
    cfg = tiny.config
    s = make_sample(cfg, 0, 6)
    outs = tiny.get_action(**collate([{**s, "embodiment_id": e} for e in (0, 1, 31)]))
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    assert (outs[0] - outs[2]).abs().max() > 1e-3


def test_input_casting_and_validation(tiny):
    cfg = tiny.config
    batch = collate([make_sample(cfg, 0, 6), make_sample(cfg, 1, 3)])
    ref = tiny.get_action(**batch)
    cast = dict(batch)
    cast["pixel_values"] = batch["pixel_values"].double()
    cast["attention_mask"] = batch["attention_mask"].bool()
    cast["input_ids"] = batch["input_ids"].int()
    cast["noise"] = batch["noise"].double()
    cast["state"] = batch["state"][..., :10].double()  # narrower state is zero-padded to max_state_dim
    short = dict(batch)
    short["state"] = torch.nn.functional.pad(batch["state"][..., :10], (0, cfg.max_state_dim - 10))
    torch.testing.assert_close(tiny.get_action(**cast), tiny.get_action(**short), atol=ATOL, rtol=0)
    assert tiny.get_action(**cast).dtype == torch.float32
    with pytest.raises(ValueError):
        tiny.get_action(**{**batch, "embodiment_id": torch.tensor([0, cfg.max_num_embodiments])})
    with pytest.raises(ValueError):
        tiny.get_action(**{**batch, "noise": batch["noise"][:, :-1]})
    assert ref.shape[0] == 2


def test_bf16_runs():
    model = build("tiny").to(torch.bfloat16)
    batch = collate([make_sample(model.config, 0, 6), make_sample(model.config, 1, 2)])
    out = model.get_action(**batch)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()  # integration and output stay fp32
    ref = build("tiny").get_action(**batch)
    assert (out.float() - ref).abs().max() < 0.25


# ------------------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_roundtrip(tiny, tmp_path):
    from transformers import AutoConfig, AutoModel

    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "model.safetensors").is_file()
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["model_type"] == "fleet_gr00t"
    assert cfg_json["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg_json["llm_config"]["model_type"] == "qwen3"

    from safetensors import safe_open

    with safe_open(os.fspath(tmp_path / "model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())
    assert saved_keys == set(tiny.state_dict().keys())

    loaded, info = FleetGr00tModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    auto = AutoModel.from_pretrained(tmp_path)
    assert type(auto) is FleetGr00tModel
    assert type(AutoConfig.from_pretrained(tmp_path)) is FleetGr00tConfig
    for m in (loaded, auto):
        m.eval()
        sd, ref_sd = m.state_dict(), tiny.state_dict()
        assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    # non-persistent buffers (rotary inv_freq, position ids) are rebuilt identically
    for (n1, b1), (n2, b2) in zip(tiny.named_buffers(), loaded.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2), n1

    batch = collate([make_sample(tiny.config, 0, 6, embodiment=3), make_sample(tiny.config, 1, 2, embodiment=9)])
    ref = tiny.get_action(**batch)
    assert torch.equal(loaded.get_action(**batch), ref)
    assert torch.equal(auto.get_action(**batch), ref)


def test_config_roundtrip(tmp_path):
    cfg = FleetGr00tConfig.from_preset("tiny", max_num_embodiments=8, llm_config={"vocab_size": 300})
    assert cfg.vocab_size == 300 and cfg.llm_config.vocab_size == 300
    cfg.save_pretrained(tmp_path)
    back = FleetGr00tConfig.from_pretrained(tmp_path)
    assert back.to_dict() == cfg.to_dict()
    assert back.max_num_embodiments == 8 and back.llm_config.vocab_size == 300
    assert type(back.vision_config).__name__ == "SiglipVisionConfig"
    assert type(back.llm_config).__name__ == "Qwen3Config"
    assert back.vision_config.image_size == back.image_size == 32
    # default values = the "small" preset
    assert FleetGr00tConfig().to_dict() == FleetGr00tConfig.from_preset("small").to_dict()
    with pytest.raises(KeyError):
        FleetGr00tConfig.from_preset("nope")


# ------------------------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------------------------


def _meta_param_count(cfg: FleetGr00tConfig) -> int:
    with torch.device("meta"):
        model = FleetGr00tModel(cfg)
    return sum(p.numel() for p in model.parameters())


def test_preset_tiny_params(tiny):
    n = tiny.num_parameters()
    print(f"tiny: {n:,} parameters")
    assert n < 2_000_000
    assert _meta_param_count(tiny.config) == n


def test_preset_small():
    model = build("small")
    cfg = model.config
    n = model.num_parameters()
    print(f"small: {n:,} parameters")
    assert 30e6 < n < 150e6
    assert cfg.image_size == 224 and cfg.num_image_tokens == 49
    assert len(model.language_model.layers) == cfg.select_layer == 4
    out = model.get_action(**collate([make_sample(cfg, 0, 10, views=1)]))
    assert out.shape == (1, 16, cfg.max_action_dim) and torch.isfinite(out).all()


def test_preset_n16_3b_config():
    cfg = FleetGr00tConfig.from_preset("n16-3b")
    assert cfg.llm_config.hidden_size == cfg.backbone_embedding_dim == 2048
    assert cfg.select_layer == 16 and cfg.llm_config.num_hidden_layers == 28
    assert cfg.vocab_size == 151680
    assert cfg.vision_config.hidden_size == 1152 and cfg.vision_config.num_hidden_layers == 27
    assert cfg.num_layers == 32 and cfg.dit_inner_dim == 32 * 48 and cfg.hidden_size == 1024
    n = _meta_param_count(cfg)
    print(f"n16-3b: {n / 1e9:.3f} B parameters")
    assert 2.5e9 < n < 3.5e9
