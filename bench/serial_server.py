"""The reference: a policy server shaped like upstream GR00T's `PolicyServer`, for the benchmark to beat.

Upstream (Isaac-GR00T `gr00t/policy/server_client.py`) binds ONE `REP` socket and answers one request at a
time: receive, decode, run the policy on that request alone, encode, send. This does the same, with the same
policy loaded in-process (`policy.load_policy`), the same codec (`clients.codec`) and the same protocol
(`clients.protocol`: envelope, observation forms, error replies, replies in the request's array encoding) as
fleetserve, so the only difference the benchmark sees is the serving
architecture: no concurrency, no batching across robots.

Endpoints: ping, get_action ([action, info], with info["server"] as fleetserve reports it, batch_size = the
request's own B), reset, get_modality_config, info (fleetserve's shape, so `bench.fleet` can drive it) and
kill (stops the server, as upstream).

    python -m bench.serial_server --checkpoint checkpoints/bench-small --embodiment gr1 --port 5555 --torch-threads 2

Prints `READY <port>` on stdout once the policy is loaded and the socket is bound (`--port 0`: a free port).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from clients.codec import CodecError, packb, unpackb_with_encoding
from clients.protocol import (
    UNAUTHORIZED,
    ArrayEncoding,
    ErrorKind,
    RequestError,
    canonical_tag,
    error_reply,
    format_action_reply,
    parse_action_request,
    parse_envelope,
    parse_options,
)

READY = "READY"
VERSION = "serial-reference"


class SerialServer:
    """One REP socket, one request at a time, the policy called in the serving thread."""

    def __init__(self, policy: Any, tag: str, host: str = "127.0.0.1", port: int = 0, api_token: str | None = None):
        self.policy = policy
        self.tag = canonical_tag(tag)
        self.api_token = api_token
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        if port == 0:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        else:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        self.host = host
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.served = 0

    # -- endpoints -------------------------------------------------------------------------------------------

    def _get_action(self, data: dict[str, Any], received: float) -> Any:
        req = parse_action_request(data)
        t0 = time.perf_counter()
        action, info = self.policy.get_actions([(req.observation, req.options)])[0]
        infer_ms = (time.perf_counter() - t0) * 1000.0
        info = dict(info)
        info["server"] = {
            "batch_size": req.samples,
            "embodiment_tag": self.tag,
            "replica": VERSION,
            "queue_ms": 0.0,  # a REP socket queues in ZMQ, where the server cannot see it
            "infer_ms": round(infer_ms, 3),
            "total_ms": round((time.perf_counter() - received) * 1000.0, 3),
        }
        return format_action_reply(req, action, info)

    def handle(self, msg: Any, received: float) -> Any:
        """The reply to one decoded request; a refused request raises RequestError."""
        env = parse_envelope(msg)
        if self.api_token is not None and env.api_token != self.api_token:
            raise RequestError(UNAUTHORIZED, ErrorKind.UNAUTHORIZED)
        if env.embodiment_tag is not None:
            try:
                served = canonical_tag(env.embodiment_tag) == self.tag
            except ValueError:
                served = False  # not even a tag name
            if not served:
                raise RequestError(f"embodiment_tag: {env.embodiment_tag!r:.60} is not served here; served: {self.tag}")
        if env.endpoint == "get_action":
            return self._get_action(env.data, received)
        if env.endpoint == "ping":
            return {"status": "ok", "message": "Server is running", "embodiment_tag": self.tag}
        if env.endpoint == "reset":
            return self.policy.reset(parse_options(env.data.get("options")))
        if env.endpoint == "get_modality_config":
            return self.policy.get_modality_config()
        if env.endpoint == "info":
            return {"default_embodiment": self.tag, "embodiments": {self.tag: self.policy.describe()}, "version": VERSION}
        self._stop.set()  # kill: parse_envelope let only known endpoints through
        return {"status": "ok", "message": "Server is shutting down"}

    # -- loop ------------------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        sock = self._sock
        try:
            while not self._stop.is_set():
                if not sock.poll(100, zmq.POLLIN):
                    continue
                frame = sock.recv(copy=False)
                received = time.perf_counter()
                encoding = None
                try:
                    msg, encoding = unpackb_with_encoding(frame.buffer)
                    reply = self.handle(msg, received)
                except CodecError as exc:
                    reply = error_reply(f"request: {exc}", ErrorKind.BAD_REQUEST)
                except RequestError as exc:
                    reply = error_reply(str(exc), exc.kind)
                except Exception as exc:  # noqa: BLE001 - upstream answers every failure as {"error": str(e)}
                    reply = error_reply(str(exc) or type(exc).__name__, ErrorKind.POLICY)
                try:
                    payload = packb(reply, encoding or ArrayEncoding.NPY)
                except Exception as exc:  # noqa: BLE001
                    payload = packb(error_reply(f"reply could not be encoded: {exc}", ErrorKind.INTERNAL))
                sock.send(payload, copy=False)
                self.served += 1
        finally:
            sock.close(linger=0)
            self._ctx.term()

    def start(self) -> "SerialServer":
        """Serve in a daemon thread (tests); `stop()` ends it."""
        self._thread = threading.Thread(target=self.serve_forever, name=f"serial-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


# ---------------------------------------------------------------------------------------------------------
# as a separate process


class SerialServerProcess:
    """`python -m bench.serial_server` in a subprocess; `port` once it printed READY."""

    def __init__(self, checkpoint: str, tag: str, *, port: int = 0, device: str = "cpu", torch_threads: int | None = None,
                 host: str = "127.0.0.1", startup_timeout_s: float = 300.0, log_path: str | None = None):
        cmd = [sys.executable, "-m", "bench.serial_server", "--checkpoint", str(checkpoint), "--embodiment", tag,
               "--port", str(port), "--host", host, "--device", device]
        if torch_threads:
            cmd += ["--torch-threads", str(torch_threads)]
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        if torch_threads:  # the same OpenMP width the replica and the limit get
            env["OMP_NUM_THREADS"] = str(torch_threads)
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=str(root))
        self.host = host
        self.port = self._wait_ready(startup_timeout_s)

    def _wait_ready(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(READY):
                return int(line.split()[1])
        self.stop()
        raise RuntimeError(f"serial server did not start (exit code {self.proc.poll()}); see its log")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "SerialServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serial_server",
                                description="Upstream-shaped serial GR00T policy server (REP, one request at a time).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--embodiment", default="gr1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555, help="0: a free port (printed on the READY line)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--api-token", default=None)
    args = p.parse_args(argv)

    import torch

    import policy

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pol = policy.load_policy(args.checkpoint, args.embodiment, device=args.device, dtype=args.dtype)
    server = SerialServer(pol, args.embodiment, args.host, args.port, args.api_token)
    print(f"{READY} {server.port} torch_threads={torch.get_num_threads()}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
