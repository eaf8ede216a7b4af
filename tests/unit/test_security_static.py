"""Security without a served fleet: the CurveZMQ keys tool, and no unpickling nor eval anywhere in the code that
decodes a robot's bytes (the served fleet's tokens, CURVE, kill and pickle bombs: tests/integration/test_security.py)."""

from __future__ import annotations

import re
from pathlib import Path

import zmq

from clients.keys import main as keys_main, read_key

ROOT = Path(__file__).resolve().parents[2]


def test_keys_tool_writes_a_usable_pair_with_a_private_secret(tmp_path, capsys):
    assert keys_main(["--out", str(tmp_path), "--name", "robot-7"]) == 0
    out = capsys.readouterr().out
    public, secret = read_key(tmp_path / "robot-7.key"), read_key(tmp_path / "robot-7.key_secret")
    assert f"public_key: {public}" in out and f"secret_key: {secret}" in out
    assert "allowed_client_keys" in out and "client_keys=" in out
    assert (tmp_path / "robot-7.key_secret").stat().st_mode & 0o777 == 0o600
    assert zmq.curve_public(secret.encode()) == public.encode()  # the files hold one pair
    assert keys_main(["--out", str(tmp_path), "--name", "robot-7"]) == 1  # never overwrites silently
    assert read_key(tmp_path / "robot-7.key") == public


_FORBIDDEN = [
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"\b(c?pickle|cloudpickle|dill)\.(loads?|Unpickler)\b"), "unpickling"),
    (re.compile(r"(?<![\w.])eval\s*\("), "eval("),
    (re.compile(r"(?<![\w.])exec\s*\("), "exec("),
    (re.compile(r"\bmarshal\.loads?\b"), "marshal.load"),
    (re.compile(r"\byaml\.load\s*\((?![^)]*Loader\s*=\s*yaml\.SafeLoader)"), "yaml.load without SafeLoader"),
]


def test_source_tree_has_no_unpickling_nor_eval_in_clients_and_serving():
    offenders = []
    files = sorted((ROOT / "clients").rglob("*.py")) + sorted((ROOT / "serving").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in _FORBIDDEN:
                if pattern.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {what}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
