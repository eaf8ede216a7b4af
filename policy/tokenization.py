"""The text side of a GR00T prompt: the backbone's tokenizer and chat template, loaded offline.

NVIDIA's checkpoints carry neither: N1.6 reads them from the Eagle-Block2A-2B-v2 folder inside Isaac-GR00T,
N1.7 from the Cosmos-Reason2 / Qwen3-VL processor folder its ``model_name`` names. A user points ``tokenizer:``
at that folder; our demo checkpoints carry a small tokenizer of their own in the same layout.

The chat template is rendered with Jinja in a sandbox (as transformers does): it is data from a file, never
evaluated as Python.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

TOKENIZER_HINT = (
    "point `tokenizer:` at the backbone's processor folder: for GR00T N1.6 the Eagle-Block2A-2B-v2 folder that "
    "ships inside Isaac-GR00T (gr00t/model/modules/nvidia/Eagle-Block2A-2B-v2: vocab.json, merges.txt, "
    "added_tokens.json, tokenizer_config.json, chat_template.json), for N1.7 the Cosmos-Reason2 / Qwen3-VL "
    "processor folder (tokenizer.json, chat template, preprocessor_config.json)"
)


class TokenizerError(ValueError):
    """No usable tokenizer where one was expected; the message says where to find one."""


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    )


def load_tokenizer(directory: str | Path):
    """The tokenizer in ``directory`` (a transformers fast tokenizer), offline.

    Loaded by class, never through AutoTokenizer: a backbone folder's config.json may name remote code, and
    AutoTokenizer would ask to run it.
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise TokenizerError(f"tokenizer {d}: not a directory; {TOKENIZER_HINT}")
    if not has_tokenizer(d):
        raise TokenizerError(f"tokenizer {d}: no tokenizer.json (nor vocab.json + merges.txt) in it; {TOKENIZER_HINT}")
    try:
        if (d / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)
        else:
            from transformers import Qwen2TokenizerFast

            tok = Qwen2TokenizerFast.from_pretrained(str(d), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - name the folder whatever the tokenizer library raised
        raise TokenizerError(f"tokenizer {d}: cannot load it ({type(exc).__name__}: {exc})") from None
    if tok.pad_token_id is None:
        raise TokenizerError(f"tokenizer {d}: the tokenizer has no pad token")
    return tok


def load_chat_template(directory: str | Path) -> str | None:
    """The processor's chat template: chat_template.json (NVIDIA's Eagle folder) or chat_template.jinja."""
    d = Path(directory).expanduser()
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        try:
            data = json.loads((d / "chat_template.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise TokenizerError(f"{d / 'chat_template.json'}: not valid JSON ({exc})") from None
        template = data.get("chat_template") if isinstance(data, dict) else None
        if not isinstance(template, str):
            raise TokenizerError(f"{d / 'chat_template.json'}: missing key 'chat_template' (a string)")
        return template
    return None


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return _compiled(template).render(messages=messages, add_generation_prompt=False, **kwargs)


_NOT_WORD = re.compile(r"[^\w\s]")


def formalize_language(text: str) -> str:
    """GR00T's ``formalize_language``: lower case, every character that is neither a word character nor
    whitespace removed (Unicode-aware); whitespace kept as it is."""
    return _NOT_WORD.sub("", text.lower())


__all__ = ["TokenizerError", "formalize_language", "has_tokenizer", "load_chat_template", "load_tokenizer", "render_chat"]
