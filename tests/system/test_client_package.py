"""The robot SDK as its own package: `pip install ./clients` into a fresh venv holding nothing else.

Slow-ish (~25 s: a venv, pip resolving numpy, pyzmq and msgpack from the configured package index); marked `slow`.
The installed copy must import, import no server dependency, and speak to a REP socket of this process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"numpy", "pyzmq", "msgpack", "fleetserve-client", "pip", "setuptools", "wheel"}


@pytest.mark.slow
def test_clients_installs_and_imports_in_a_venv_with_nothing_else(tmp_path):
    # Build from a copy, so pip's build leftovers never land in the source tree.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "clients", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
                   check=True, timeout=400, env=env, cwd=tmp_path)
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                            check=True, timeout=60, env=env, cwd=tmp_path, capture_output=True, text=True).stdout
    installed = {line.split("==")[0].lower() for line in listed.split()}
    assert installed <= ALLOWED, f"the robot package pulled more than numpy, pyzmq and msgpack: {installed - ALLOWED}"
    code = (
        "import sys, numpy as np, zmq, threading\n"
        "import clients, clients.protocol, clients.example, clients.keys, clients.observations\n"
        "from clients import PolicyClient, packb, unpackb\n"
        "assert 'site-packages' in clients.__file__, clients.__file__\n"
        "ctx = zmq.Context(); rep = ctx.socket(zmq.REP); port = rep.bind_to_random_port('tcp://127.0.0.1')\n"
        "def serve():\n"
        "    msg = unpackb(rep.recv()); rep.send(packb({'error': 'nope', 'kind': 'refused'} if msg['endpoint'] == 'kill'\n"
        "                                          else {'status': 'ok'}))\n"
        "    msg = unpackb(rep.recv()); rep.send(packb({'error': 'nope', 'kind': 'refused'}))\n"
        "t = threading.Thread(target=serve); t.start()\n"
        "c = PolicyClient('127.0.0.1', port, timeout_ms=5000)\n"
        "assert c.ping()\n"
        "try:\n"
        "    c.kill_server(); raise SystemExit('no error raised')\n"
        "except clients.PolicyServerError as e:\n"
        "    assert e.kind == 'refused' and e.message == 'nope'\n"
        "t.join(5); c.close(); rep.close(0); ctx.term()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'pydantic', 'serving', 'policy', 'bench'))\n"
        "assert not bad, bad\n"
        "print('OK')\n"
    )
    out = subprocess.run([str(py), "-c", code], env=env, cwd=tmp_path, timeout=60, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]
