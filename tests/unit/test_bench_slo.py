"""bench/slo.py's robot and its verdicts, against a real ZMQ server on 127.0.0.1 that answers with a known
delay (a stand-in for a policy server: the benchmark judges replies, not models)."""

from __future__ import annotations

import threading
import time

import zmq

from bench.slo import check_targets, drive
from clients.codec import packb, unpackb
from clients.protocol import ErrorKind, Refusal, error_reply
from support.net import free_port


def _server(port: int, stop: threading.Event, delay_s: float) -> None:
    """REP server: 'action' after delay_s, or an early refusal when the request's deadline is below it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    try:
        while not stop.is_set():
            if not sock.poll(50):
                continue
            req = unpackb(sock.recv())
            deadline_ms = (req["data"]["options"] or {}).get("deadline_ms", 1e9)
            if deadline_ms < delay_s * 1000:
                sock.send(packb(error_reply("deadline: refused early, predicted 50 ms", ErrorKind.DEADLINE,
                                            Refusal.REFUSED_EARLY)))
            else:
                time.sleep(delay_s)
                sock.send(packb([{"a": 1}, {}]))
    finally:
        sock.close(0)
        ctx.term()


def test_slo_robots_count_on_time_and_refused_per_class():
    port, stop = free_port(), threading.Event()
    t = threading.Thread(target=_server, args=(port, stop, 0.02), daemon=True)
    t.start()
    try:
        payloads = {cls: packb({"endpoint": "get_action", "data": {"observation": {}, "options": {"deadline_ms": ms}}})
                    for cls, ms in (("tight", 5.0), ("loose", 500.0))}
        point = drive(f"tcp://127.0.0.1:{port}", payloads, robots=2, hz=10.0,
                      deadlines={"tight": 5.0, "loose": 500.0}, warmup_s=0.2, window_s=1.0)
    finally:
        stop.set()
        t.join(5)
    tight, loose = point["classes"]["tight"], point["classes"]["loose"]
    assert tight["sent"] > 0 and tight["refused"] == tight["sent"] and tight["on_time"] == 0
    assert loose["sent"] > 0 and loose["on_time"] == loose["sent"] and loose["attainment"] == 1.0
    assert point["all"]["late"] == 0 and point["all"]["no_answer"] == 0


def test_slo_targets_pass_and_miss_on_the_figures():
    def point(robots, goodput, tight, late=0, worst=0.0):
        return {"robots": robots, "all": {"goodput": goodput, "late": late, "no_answer": 0, "worst_past_deadline_s": worst},
                "classes": {"tight": {"attainment": tight}}}

    good = check_targets({"points": [point(10, 9.0, 1.0), point(40, 8.5, 0.97)]}, capacity=10.0, hz=1.0)
    assert all(t["pass"] for t in good), good
    bad = check_targets({"points": [point(10, 9.0, 1.0), point(40, 5.0, 0.5, late=3, worst=2.5)]}, capacity=10.0, hz=1.0)
    assert [t["pass"] for t in bad] == [False, False, False, False], bad
