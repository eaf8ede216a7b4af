"""The fleet load generator (bench/fleet.py) against the serial reference server (bench/serial_server.py).

Real ZMQ on 127.0.0.1, the tiny demo model, no Ray.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from clients import PolicyClient, PolicyServerError, packb, unpackb
from bench.fleet import FleetReport, build_parser, run_fleet_sync
from bench.report import plot_report
from bench.robots import Target, fetch_info, parse_target
from clients.observations import random_observation
from support.net import free_port


@pytest.fixture(scope="module")
def serial_server(tiny_checkpoint):
    import torch

    import policy
    from bench.serial_server import SerialServer

    # One torch thread: the fleet's event loop shares these 2 cores, and OpenMP threads spinning against it
    # were measured 10-100x slower than one thread on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pol = policy.load_policy(tiny_checkpoint, "gr1", device="cpu")
    server = SerialServer(pol, "gr1", "127.0.0.1", 0).start()
    yield server
    server.stop()
    torch.set_num_threads(threads)


def test_fleet_tool_imports_without_matplotlib_torch_or_ray():
    code = (
        "import sys; import bench.fleet, clients; "
        "bad = [m for m in ('matplotlib', 'torch', 'ray') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_parse_target():
    assert parse_target("127.0.0.1:5555") == Target("127.0.0.1", 5555)
    assert parse_target("5556") == Target("127.0.0.1", 5556)
    assert parse_target("host:5555/unitree_g1") == Target("host", 5555, "unitree_g1")
    assert parse_target("[::1]:7000").address == "tcp://[::1]:7000"
    with pytest.raises(ValueError, match="port"):
        parse_target("host:http")
    with pytest.raises(ValueError, match="range"):
        parse_target("host:70000")
    args = build_parser().parse_args(["--ports", "5555,5556", "--sweep", "1,4", "--image-size", "64x48"])
    assert args.ports == [5555, 5556] and args.sweep == [1, 4] and args.image_size == (64, 48)


def test_serial_server_answers_ping_info_and_get_action(serial_server):
    with PolicyClient("127.0.0.1", serial_server.port, timeout_ms=30_000) as c:
        assert c.ping()
        info = c.info()
        assert info["default_embodiment"] == "gr1"
        gr1 = info["embodiments"]["gr1"]
        assert set(c.get_modality_config()) == {"video", "state", "action", "language"}
        action, action_info = c.get_action(random_observation(gr1, 2))
        for key, dim in gr1["action_dims"].items():
            assert action[key].shape == (2, gr1["action_horizon"], dim)
            assert action[key].dtype == np.float32
        assert action_info["server"]["batch_size"] == 2
        assert action_info["server"]["embodiment_tag"] == "gr1"
        assert action_info["server"]["total_ms"] >= action_info["server"]["infer_ms"] > 0
        with PolicyClient("127.0.0.1", serial_server.port, timeout_ms=30_000, embodiment_tag="franka") as other:
            with pytest.raises(PolicyServerError, match="not served here"):
                other.get_action(random_observation(gr1, 1))
        with pytest.raises(PolicyServerError):
            c.get_action({"video": {}, "state": {}, "language": {}})  # an error reply, and the server goes on
        assert c.ping()


def test_fleet_bounded_by_requests_all_answered(serial_server, tmp_path):
    target = f"127.0.0.1:{serial_server.port}"
    report = run_fleet_sync([target], 8, None, requests=40, timeout_ms=30_000)
    assert isinstance(report, FleetReport)
    assert report.sent == 40
    assert report.answered == 40
    assert report.errors == 0 and report.errors_by_kind == {}
    assert report.in_flight_at_stop == 0
    assert report.consistent
    assert report.window_answered == 40
    assert report.throughput_rps > 0 and report.samples_per_s == pytest.approx(report.throughput_rps)
    lat = report.latency_ms
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert report.mean_batch_size == 1.0  # the serial server never batches
    assert 0 <= report.overhead_ms["p50"] <= lat["p50"]  # latency minus the server's infer_ms
    assert report.per_target[target]["robots"] == 8
    assert report.per_target[target]["answered"] == 40
    path = tmp_path / "fleet.json"
    doc = report.to_json()
    path.write_text(json.dumps(doc))
    loaded = json.loads(path.read_text())
    for key in ("sent", "answered", "errors", "in_flight_at_stop", "errors_by_kind", "throughput_rps", "latency_ms",
                "mean_batch_size", "consistent"):
        assert key in loaded, key
    assert loaded["consistent"] is True and "latencies" not in loaded
    assert "timeout" not in report.summary()


def test_fleet_duration_warmup_and_batch(serial_server):
    report = run_fleet_sync([f"127.0.0.1:{serial_server.port}"], 4, 2.0, warmup_s=0.5, batch=2, timeout_ms=30_000)
    assert report.consistent
    assert report.errors == 0 and report.in_flight_at_stop == 0  # drained: every request came back
    assert report.answered >= report.window_answered > 0
    assert report.mean_batch_size == 2.0
    assert report.samples_per_s == pytest.approx(2 * report.throughput_rps, rel=1e-3)
    assert 1.0 <= report.window_s <= 2.0
    assert report.wall_s < 2.0 + 30


def test_fleet_cli_writes_json_and_plot(serial_server, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--ports", str(serial_server.port), "--robots", "3", "--requests", "12",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out_json.read_text())
    assert doc["answered"] == 12 and doc["consistent"]
    assert out_png.stat().st_size > 1000
    assert "throughput" in proc.stdout


def test_dead_target_times_out_counts_errors_and_ends_in_bound(serial_server, tmp_path):
    embodiment = fetch_info(f"127.0.0.1:{serial_server.port}")["embodiments"]["gr1"]
    dead = Target("127.0.0.1", free_port())  # nothing listens there
    live = Target("127.0.0.1", serial_server.port)
    t0 = time.monotonic()
    report = run_fleet_sync([dead, live], 4, 1.5, timeout_ms=300, drain_s=1.0,
                            embodiments={dead.label: embodiment})
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5 + 1.0 + 3.0, elapsed
    assert report.consistent, report.summary()
    assert report.errors_by_kind.get("timeout", 0) >= 2  # 2 robots on the dead target, each timing out repeatedly
    assert report.errors == report.errors_by_kind["timeout"]
    assert report.per_target[dead.label]["answered"] == 0
    assert report.per_target[dead.label]["errors"] >= 2
    assert report.per_target[live.label]["answered"] > 0  # the live half of the fleet is unaffected
    assert "timeout" in report.summary()
    plot_report(report, str(tmp_path / "lat.png"))


def test_dead_target_without_info_fails_fast():
    dead = Target("127.0.0.1", free_port())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no reply to 'info'"):
        run_fleet_sync([dead], 2, 1.0, timeout_ms=300)
    assert time.monotonic() - t0 < 5


# What an `info` reply says of an embodiment, for the stub servers below (they answer no `info`).
STUB_EMBODIMENT = {
    "modality_config": {"video": {"delta_indices": [0]}, "state": {"delta_indices": [0]},
                        "language": {"delta_indices": [0], "modality_keys": ["task"]}},
    "image_size": [8, 8], "video_keys": ["cam"], "state_dims": {"arm": 3},
}


@contextlib.contextmanager
def stub_server(answer):
    """A REP server on 127.0.0.1 answering each request with `answer(n, stop)` (n counts from 1; `stop` is set when
    the test ends, for an answer that waits); yields its address. It answers no `info`: give STUB_EMBODIMENT."""
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        n = 0
        while not stop.is_set():
            if sock.poll(50):
                unpackb(sock.recv())
                n += 1
                sock.send(packb(answer(n, stop)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_error_replies_grouped_by_prefix(tmp_path):
    """A server that answers every request with an error: counted by message prefix, never as answered."""
    def answer(n, stop):
        return {"error": f"policy 'gr1' failed: boom #{n}"} if n % 2 else {"error": "Unauthorized: Invalid API token"}

    with stub_server(answer) as target:
        report = run_fleet_sync([target], 2, None, requests=10, timeout_ms=5000, embodiments={target: STUB_EMBODIMENT})
    assert report.sent == 10 and report.answered == 0 and report.errors == 10 and report.consistent
    assert report.errors_by_kind == {"error reply: policy 'gr1' failed": 5, "error reply: Unauthorized": 5}
    assert report.latency_ms["p50"] is None


def test_replies_drained_after_the_window_do_not_count_in_it():
    """A server answering every request 0.5 s after it came, one robot, 1.25 s of sending: replies at 0.5 and 1.0 s
    fall in the window; the one sent at 1.0 s is answered at 1.5 s, in the drain, and counts as answered but not
    in the window's throughput (it once did: closed-loop throughput was inflated by robots / window)."""
    def answer(n, stop):
        stop.wait(0.5)
        return [{"arm": np.zeros((1, 2, 3), np.float32)}, {}]

    with stub_server(answer) as target:
        report = run_fleet_sync([target], 1, 1.25, timeout_ms=5000, drain_s=3.0, embodiments={target: STUB_EMBODIMENT})
    assert report.answered == 3 and report.consistent
    assert report.window_answered == 2
    assert report.window_s == pytest.approx(1.25, abs=0.05)
    assert report.throughput_rps == pytest.approx(2 / report.window_s, rel=1e-3)


@pytest.mark.parametrize("processes", [2])
def test_fleet_over_processes(serial_server, processes):
    report = run_fleet_sync([f"127.0.0.1:{serial_server.port}"], 4, None, requests=16, timeout_ms=30_000,
                            processes=processes)
    assert report.processes == processes
    assert report.sent == 16 and report.answered == 16 and report.consistent
    assert report.per_target[f"127.0.0.1:{serial_server.port}"]["robots"] == 4


def test_bench_limit_interpolation_ratios_and_targets(tmp_path):
    from bench.limit import interpolate
    from bench.profiling import summarize_profile
    from bench.run import TARGETS_CPU, analyse, check_targets

    rows = [{"batch_size": 1, "samples_per_s": 10.0}, {"batch_size": 4, "samples_per_s": 20.0},
            {"batch_size": 16, "samples_per_s": 40.0}]
    assert interpolate(rows, 1) == 10.0 and interpolate(rows, 0.5) == 10.0 and interpolate(rows, 64) == 40.0
    assert interpolate(rows, 2) == pytest.approx(15.0)  # linear in log2(B)
    assert interpolate(rows, 8) == pytest.approx(30.0)

    def point(n, sps, p50, p99, batch):
        return {"robots": n, "samples_per_s": sps, "latency_ms": {"p50": p50, "p99": p99}, "mean_batch_size": batch,
                "errors": 0}

    small = {"limit": {"rows": rows},
             "serial": [point(1, 10.0, 100.0, 120.0, 1.0), point(16, 10.0, 1600.0, 1700.0, 1.0)],
             "served": [point(1, 9.5, 103.0, 130.0, 1.0), point(16, 36.0, 450.0, 600.0, 8.0)]}
    small["table"] = analyse(small)
    row16 = small["table"][1]
    assert row16["served_vs_serial"] == 3.6
    assert row16["limit_at_batch"] == pytest.approx(30.0)
    assert row16["served_vs_limit"] == pytest.approx(1.2)
    assert small["table"][0]["p50_delta_ms"] == 3.0
    status = {t["id"]: t["status"] for t in check_targets({"presets": {"small": small}}, TARGETS_CPU)}
    assert status == {"small-16-vs-serial": "PASS", "small-16-vs-limit": "PASS", "small-1-p50": "PASS", "small-1-overhead": "n/a",
                      "tiny-64-vs-serial": "n/a"}

    # Two replicas answered: compared with two limit processes side by side; and with the faster serial server.
    two = [dict(r, samples_per_s=2 * r["samples_per_s"]) for r in rows]
    scaled = {"limit": {"rows": rows, "rows_by_processes": {"1": rows, "2": two}},
              "serial": [point(16, 10.0, 1600.0, 1700.0, 1.0)],
              "serial_all_cores": [point(16, 20.0, 800.0, 900.0, 1.0)],
              "served": [dict(point(16, 36.0, 450.0, 600.0, 8.0), replicas={"a": 10, "b": 12})]}
    scaled["table"] = analyse(scaled)
    (row,) = scaled["table"]
    assert row["served_replicas"] == 2 and row["limit_processes"] == 2
    assert row["limit_at_batch"] == pytest.approx(60.0) and row["served_vs_limit"] == pytest.approx(0.6)
    assert row["served_vs_serial"] == 3.6 and row["served_vs_best_serial"] == 1.8
    status = {t["id"]: t for t in check_targets({"presets": {"small": scaled}}, TARGETS_CPU)}
    assert status["small-16-vs-serial"]["value"] == 1.8 and status["small-16-vs-serial"]["status"] == "PASS"
    assert status["small-16-vs-limit"]["status"] == "MISS"

    raw = tmp_path / "profile.txt"
    raw.write_text(
        "Thread.run (threading.py:982) 30\n"
        "_forward (serving/policy_deployment.py:1);get_action (policy/modeling.py:3);forward (torch/nn/modules/linear.py:5) 60\n"
        "_answer (serving/ingress.py:9);send (zmq/sugar/socket.py:7) 10\n"
    )
    summary = summarize_profile(raw)
    assert summary["samples"] == 100 and summary["busy_samples"] == 70
    cats = dict(summary["categories_pct_of_all"])
    assert cats == {"model forward (torch)": 60.0, "threads parked in C (not CPU work)": 30.0, "ZMQ sockets": 10.0}
