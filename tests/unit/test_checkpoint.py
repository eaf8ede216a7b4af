"""Demo checkpoints (GR00T N1.6 checkpoints in NVIDIA's layout): determinism, layout, the race-safe
ensure_demo_checkpoint, the CLI; embodiment tags."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import policy
from policy import make_demo_checkpoint as mdc
from policy.checkpoint import CheckpointError, read_checkpoint
from policy.configuration_gr00t_n1d6 import EagleBackboneConfig, Gr00tN1d6Config
from policy.embodiment import KNOWN_TAGS, resolve_tag
from policy.tokenization import load_tokenizer

FILES = ("config.json", "model.safetensors", "processor_config.json", "statistics.json", "embodiment_id.json",
         "backbone/config.json", "backbone/tokenizer.json", "backbone/tokenizer_config.json",
         "backbone/special_tokens_map.json", "backbone/chat_template.json")


def _bytes(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(Path(path).rglob("*")) if f.is_file()}


def test_build_is_deterministic_byte_for_byte(tiny_checkpoint, tmp_path):
    again = policy.build_demo_checkpoint(tmp_path / "again", "tiny", ("gr1", "unitree_g1"), seed=0)
    a, b = _bytes(tiny_checkpoint), _bytes(again)
    assert set(a) == set(FILES)
    for name in FILES:
        assert a[name] == b[name], name
    other = mdc.build_demo_checkpoint(tmp_path / "seed1", "tiny", "gr1,unitree_g1", seed=1)
    assert (other / "model.safetensors").read_bytes() != a["model.safetensors"]
    assert (other / "statistics.json").read_bytes() != a["statistics.json"]


def test_it_is_an_n16_checkpoint_in_nvidias_layout(tiny_checkpoint):
    info = read_checkpoint(tiny_checkpoint)
    assert info.model_type == "Gr00tN1d6" and info.tags == ["gr1", "unitree_g1"]
    assert info.config["fleet_demo"]["preset"] == "tiny" and info.config["model_name"] == "backbone"
    config = Gr00tN1d6Config.from_checkpoint_dict(info.config)  # only the fields that differ from N1.6's defaults
    assert config.num_inference_timesteps == 4 and config.use_alternate_vl_dit and config.action_horizon == 16
    assert "num_inference_timesteps" not in info.config
    assert info.embodiment_ids == {"gr1": 20, "unitree_g1": 8}  # NVIDIA's projector rows for those tags
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "backbone.model.vision_model.vision_model.embeddings.patch_embedding.weight" in names
    assert "backbone.model.language_model.model.layers.0.self_attn.q_norm.weight" in names
    assert "action_head.model.transformer_blocks.1.attn1.to_q.weight" in names
    assert "action_head.action_encoder.W2.W" in names
    backbone = EagleBackboneConfig.from_file(tiny_checkpoint / "backbone" / "config.json")
    assert backbone.text.hidden_size == config.backbone_embedding_dim


def test_layout_and_statistics(tiny_checkpoint):
    info = read_checkpoint(tiny_checkpoint)
    gr1 = info.embodiment("gr1")
    assert gr1.video_keys == ["ego_view_bg_crop_pad_res256_freq20"]
    assert gr1.state_dims == {"left_arm": 7, "right_arm": 7, "left_hand": 6, "right_hand": 6, "waist": 3}
    assert gr1.action_horizon == 16 and gr1.language_keys == ["annotation.human.task_description"]
    reps = {k: (a.rep.name, a.state_key) for k, a in zip(gr1.action_keys, gr1.modality_configs["action"].action_configs)}
    assert reps == {"left_arm": ("RELATIVE", "left_arm"), "right_arm": ("RELATIVE", "right_arm"),
                    "left_hand": ("ABSOLUTE", None), "right_hand": ("ABSOLUTE", None), "waist": ("RELATIVE", "waist")}
    st = gr1.statistics["state"]
    assert all(-3.1 <= v <= -1.0 for v in st["left_arm"]["min"]) and all(1.0 <= v <= 3.1 for v in st["left_arm"]["max"])
    for s in st.values():
        for lo, q1, m, q99, hi in zip(s["min"], s["q01"], s["mean"], s["q99"], s["max"]):
            assert lo < q1 < m < q99 < hi
    rel = np.asarray(gr1.statistics["relative_action"]["left_arm"]["max"])
    assert rel.shape == (16, 7) and (np.diff(rel, axis=0) > 0).all()  # per-step, widening with the step
    g1 = info.embodiment("unitree_g1")
    assert g1.video_keys == ["ego_view", "wrist_view"]
    assert g1.modality_configs["state"].sin_cos_embedding_keys == ["waist"]
    assert sum(g1.action_dims.values()) == 32


def test_tokenizer_is_offline_portable_and_has_eagles_tokens(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint / "backbone")
    ids = tok("<|im_start|>user\nPick the PEAR<image 1><img><IMG_CONTEXT><IMG_CONTEXT></img>", add_special_tokens=False)["input_ids"]
    img = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(img) == 2 and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.unk_token_id not in ids  # unknown words are spelt with characters
    backbone = json.loads((tiny_checkpoint / "backbone" / "config.json").read_text())
    assert backbone["image_token_index"] == img
    assert json.loads((tiny_checkpoint / "backbone" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_custom_tag_gets_the_generic_layout_and_a_free_projector_row(tmp_path):
    path = policy.build_demo_checkpoint(tmp_path / "custom", "tiny", ["My_Robot"], seed=0)
    info = read_checkpoint(path)
    spec = info.embodiment("my_robot")
    assert spec.video_keys == ["front_view"] and spec.state_dims == {"joints": 7} and spec.action_dims == {"joints": 7}
    assert spec.embodiment_id not in (13, 20, 24, 8, 2, 0, 1, 16, 10)  # none of NVIDIA's rows
    pol = policy.load_policy(path, "MY_ROBOT")
    action, _ = pol.get_action(pol.dummy_observation(2, height=40, width=40), {"seed": 0})
    assert action["joints"].shape == (2, 16, 7)


def test_ensure_builds_once_and_reuses(tmp_path):
    out = tmp_path / "demo"
    first = policy.ensure_demo_checkpoint(out, "tiny", ("gr1",))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = policy.ensure_demo_checkpoint(out, "tiny", ["GR1"])
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert oct(first.stat().st_mode & 0o777) != "0o700"  # not mkdtemp's private mode
    with pytest.raises(CheckpointError, match="'unitree_g1' is not in checkpoint"):
        policy.ensure_demo_checkpoint(out, "tiny", ("unitree_g1",))
    with pytest.raises(CheckpointError, match="preset 'tiny' is already there, 'small' was asked for"):
        policy.ensure_demo_checkpoint(out, "small", ("gr1",))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        policy.ensure_demo_checkpoint(junk, "tiny", ("gr1",))
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_ensure_loser_of_a_race_uses_the_winners_checkpoint(tmp_path, monkeypatch):
    """Simulate another process finishing first, between our existence check and our rename."""
    out = tmp_path / "raced"
    real_write = mdc.write_demo_checkpoint

    def write_then_lose(tmp_dir, preset, tags, seed):
        real_write(tmp_dir, preset, tags, seed)
        if not out.exists():
            real_write(out.parent / "winner", preset, tags, seed)
            (out.parent / "winner").rename(out)
            (out / "winner.txt").write_text("the other process")

    monkeypatch.setattr(mdc, "write_demo_checkpoint", write_then_lose)
    got = mdc.ensure_demo_checkpoint(out, "tiny", ("gr1",))
    assert got == out.absolute() and (out / "winner.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raced"]  # our temporary copy is gone


def test_ensure_concurrent_callers_agree(tmp_path):
    out = tmp_path / "concurrent"
    results, errors = [], []

    def run():
        try:
            results.append(policy.ensure_demo_checkpoint(out, "tiny", ("gr1",)))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    read_checkpoint(out).embodiment("gr1")
    assert [p.name for p in tmp_path.iterdir()] == ["concurrent"]


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert mdc.main([str(out), "--preset", "tiny", "--embodiments", "gr1", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert read_checkpoint(out).config["fleet_demo"]["seed"] == 3
    assert mdc.main([str(out), "--preset", "tiny", "--embodiments", "gr1"]) == 1
    assert "exists" in capsys.readouterr().err
    assert mdc.main([str(out), "--preset", "tiny", "--embodiments", "unitree_g1", "--force"]) == 0
    assert read_checkpoint(out).tags == ["unitree_g1"]


def test_embodiment_tags():
    assert resolve_tag("GR1") == "gr1" and resolve_tag("EmbodimentTag.GR1") == "gr1" and resolve_tag("gr1") == "gr1"
    assert resolve_tag("embodimenttag.unitree_g1") == "unitree_g1"
    assert resolve_tag(policy.EmbodimentTag.OXE_WIDOWX) == "oxe_widowx"
    assert resolve_tag(" New_Embodiment ") == "new_embodiment"
    assert resolve_tag("My-Robot.v2") == "my-robot.v2"
    assert {"gr1", "unitree_g1", "libero_panda", "oxe_google", "oxe_widowx", "robocasa_panda_omron",
            "behavior_r1_pro", "new_embodiment"} <= set(KNOWN_TAGS)
    for bad in ("", "two words", "a/b", 3, None):
        with pytest.raises(ValueError, match="embodiment tag"):
            resolve_tag(bad)


def test_ensure_builds_once_while_concurrent_callers_wait(tmp_path, monkeypatch):
    """Replicas starting together: one builds, the others wait for it instead of building copies."""
    out = tmp_path / "once"
    builds = []
    real_write = mdc.write_demo_checkpoint

    def counting_write(*args, **kwargs):
        builds.append(threading.get_ident())
        return real_write(*args, **kwargs)

    monkeypatch.setattr(mdc, "write_demo_checkpoint", counting_write)
    errors: list[BaseException] = []

    def run():
        try:
            mdc.ensure_demo_checkpoint(out, "tiny", ("gr1",))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["once"]  # no temporary copy, no lock file left


def test_demo_model_is_drawn_directly_in_its_dtype_and_deterministically():
    import torch

    model = mdc.build_demo_model("tiny", seed=0, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    again = mdc.build_demo_model("tiny", seed=0, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert mdc.demo_dtype("n16-3b") == torch.bfloat16 and mdc.demo_dtype("small") == torch.float32


def test_n16_3b_preset_has_the_released_models_sizes():
    import torch

    from policy.modeling_gr00t_n1d6 import Gr00tN1d6

    config, backbone = mdc.preset_config("n16-3b")
    with torch.device("meta"):
        model = Gr00tN1d6(config, backbone)
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert backbone.vision.hidden_size == 1152 and backbone.vision.num_hidden_layers == 27
    assert backbone.text.hidden_size == 2048 and config.select_layer == 16 and backbone.text.vocab_size == 151680
    assert config.dit.num_layers == 32 and config.input_embedding_dim == 1536 and config.hidden_size == 1024
    assert 390e6 < count("backbone.model.vision_model") < 420e6  # SigLIP2-so400m-sized
    assert 2.8e9 < sum(p.numel() for p in model.parameters()) < 3.4e9
