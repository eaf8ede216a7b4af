"""Demo checkpoints: determinism, layout, the race-safe ensure_demo_checkpoint, the CLI; checkpoint reader errors;
embodiment tags."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import policy
from policy import make_demo_checkpoint as mdc
from policy.checkpoint import CheckpointError, load_tokenizer, read_checkpoint
from policy.configuration import FleetGr00tConfig
from policy.embodiment import KNOWN_TAGS, resolve_tag

FILES = ("config.json", "model.safetensors", "processor_config.json", "statistics.json", "embodiment_id.json",
         "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(path).iterdir())}


def test_build_is_deterministic_byte_for_byte(tiny_checkpoint, tmp_path):
    again = policy.build_demo_checkpoint(tmp_path / "again", "tiny", ("gr1", "unitree_g1"), seed=0)
    a, b = _bytes(tiny_checkpoint), _bytes(again)
    assert set(a) == set(FILES)
    for name in FILES:
        assert a[name] == b[name], name
    other = mdc.build_demo_checkpoint(tmp_path / "seed1", "tiny", "gr1,unitree_g1", seed=1)
    assert (other / "model.safetensors").read_bytes() != a["model.safetensors"]
    assert (other / "statistics.json").read_bytes() != a["statistics.json"]


def test_layout_and_statistics(tiny_checkpoint):
    info = read_checkpoint(tiny_checkpoint)
    assert info.tags == ["gr1", "unitree_g1"]
    assert info.embodiment_ids == {"gr1": 0, "unitree_g1": 1}
    assert info.processor_config["fleet_demo"]["preset"] == "tiny"
    gr1 = info.embodiment("gr1")
    assert gr1.video_keys == ["ego_view_bg_crop_pad_res256_freq20"]
    assert gr1.state_dims == {"left_arm": 7, "right_arm": 7, "left_hand": 6, "right_hand": 6, "waist": 3}
    assert gr1.action_horizon == 16 and gr1.language_keys == ["annotation.human.task_description"]
    reps = {k: (a.rep.name, a.state_key) for k, a in zip(gr1.action_keys, gr1.modality_configs["action"].action_configs)}
    assert reps == {"left_arm": ("RELATIVE", "left_arm"), "right_arm": ("RELATIVE", "right_arm"),
                    "left_hand": ("ABSOLUTE", None), "right_hand": ("ABSOLUTE", None), "waist": ("RELATIVE", "waist")}
    st = gr1.statistics["state"]
    assert all(-3.1 <= v <= -1.0 for v in st["left_arm"]["min"]) and all(1.0 <= v <= 3.1 for v in st["left_arm"]["max"])
    assert all(0 <= v <= 0.1 for v in st["left_hand"]["min"]) and all(1.2 <= v <= 1.7 for v in st["left_hand"]["max"])
    for s in st.values():
        for lo, q1, m, q99, hi in zip(s["min"], s["q01"], s["mean"], s["q99"], s["max"]):
            assert lo < q1 < m < q99 < hi
    g1 = info.embodiment("unitree_g1")
    assert g1.video_keys == ["ego_view", "wrist_view"]
    assert g1.total_action_dim() == 32 and g1.encoded_state_dim() == 43
    cfg = FleetGr00tConfig.from_preset("tiny")
    assert len(load_tokenizer(tiny_checkpoint)) <= cfg.llm_config.vocab_size


def test_tokenizer_is_offline_and_portable(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint), local_files_only=True)
    enc = tok(["Pick the PEAR", "zebra"], padding=True)
    assert enc["input_ids"][0][0] == tok.bos_token_id and tok.padding_side == "right"
    assert tok.unk_token_id not in enc["input_ids"][1]  # unknown words are spelt with characters, not [UNK]
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == "pick the pear"
    cfg = json.loads((Path(tiny_checkpoint) / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((Path(tiny_checkpoint) / "special_tokens_map.json").read_text())["pad_token"] == "[PAD]"


def test_custom_tag_gets_the_generic_layout(tmp_path):
    path = policy.build_demo_checkpoint(tmp_path / "custom", "tiny", ["My_Robot"], seed=0)
    spec = read_checkpoint(path).embodiment("my_robot")
    assert spec.video_keys == ["front_view"] and spec.state_dims == {"joints": 7} and spec.action_dims == {"joints": 7}
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
    assert read_checkpoint(out).processor_config["fleet_demo"]["seed"] == 3
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


def test_demo_model_is_built_directly_in_its_dtype():
    import torch

    before = torch.get_default_dtype()
    model = mdc.build_demo_model("tiny", seed=0, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == before  # the process-wide default is restored
    buffers = {n: b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")}
    assert buffers and set(buffers.values()) == {torch.float32}  # RoPE frequencies are computed in fp32
    assert mdc.demo_dtype("n16-3b") == torch.bfloat16 and mdc.demo_dtype("small") == torch.float32
