"""NVIDIA's GR00T N1.6 reference (tests/fixtures/gr00t_n16): its checkpoint, observations, recorded tensors.

The checkpoint is put back together in a temporary directory exactly as NVIDIA wrote it, except for the rows of
the 151680-row embedding table that no reference prompt uses (zeros here: they never reach an output).

NVIDIA's tokenizer (Qwen3's 151k-token BPE with Eagle's added tokens) is not ours to redistribute, so
`RecordedTokenizer` STANDS IN for it: it answers the prompts the reference recorded with the ids the real
tokenizer gave, and refuses any other text. Set FLEETSERVE_EAGLE_TOKENIZER to a real Eagle-Block2A-2B-v2 folder
to check the real tokenizer against the same ids (tests/integration/test_gr00t_n16_parity.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gr00t_n16"
TAG = "new_embodiment"
LANGUAGE_KEY = "annotation.human.task_description"
EMBED = "backbone.model.language_model.model.embed_tokens.weight"


def build_checkpoint(out: Path) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    src = FIXTURES / "checkpoint"
    for name in ("config.json", "processor_config.json", "statistics.json", "embodiment_id.json"):
        shutil.copyfile(src / name, out / name)
    weights = load_file(str(src / "weights_without_embedding.safetensors"))
    rows = load_file(str(src / "embedding_rows.safetensors"))
    embed = torch.zeros(tuple(rows["shape"].tolist()), dtype=rows["rows"].dtype)
    embed[rows["ids"]] = rows["rows"]
    weights[EMBED] = embed
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def backbone_config() -> Path:
    return FIXTURES / "tiny_eagle_config.json"


def observation(batch: str) -> dict:
    """obs_b1 / obs_b2 in the nested wire form (language as [[str]] per sample)."""
    with np.load(FIXTURES / f"obs_{batch}.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return {
        "video": {k[6:]: v for k, v in arrays.items() if k.startswith("video.")},
        "state": {k[6:]: v for k, v in arrays.items() if k.startswith("state.")},
        "language": {LANGUAGE_KEY: [[str(t[0])] for t in arrays[f"language.{LANGUAGE_KEY}"]]},
    }


def reference(batch: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"reference_{batch}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def prompts(batch: str) -> dict:
    return json.loads((FIXTURES / f"prompts_{batch}.json").read_text())


class RecordedTokenizer:
    """Stand-in for NVIDIA's Eagle tokenizer: the recorded prompts -> the recorded ids, nothing else."""

    def __init__(self):
        self._ids: dict[str, list[int]] = {}
        for batch in ("b1", "b2"):
            ids = reference(batch)["inputs.input_ids"]
            for row, sample in zip(ids, prompts(batch)["samples"]):
                self._ids[sample["text_handed_to_tokenizer"]] = row[sample["left_padding"]:].tolist()
        special = prompts("b2")["tokenizer"]["special_token_ids"]
        self._special = dict(special)
        self.pad_token_id = special["<|endoftext|>"]
        self.unk_token_id = None

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self._special[t] for t in tokens]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert not add_special_tokens
        if text not in self._ids:
            raise KeyError(f"the stand-in tokenizer knows only the recorded prompts, not {text[:120]!r}...")
        return {"input_ids": list(self._ids[text])}
