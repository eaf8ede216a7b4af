"""The embodiment scheduler without Ray, on simulated time (tests/support/simtime.py): the real EmbodimentScheduler the
ingress uses, driven against fake replicas whose forward pass takes a known time (fixed + per-sample, plus the
call's round trip), with as many such replicas working in parallel as the test says.

Time is the loop's own: a test of seconds of traffic runs in milliseconds and gives the same answer on a busy
machine as on an idle one, so the assertions are exact where the old wall-clock ones needed wide margins.
"""

from __future__ import annotations

import asyncio

import pytest

from support import simtime
from clients.protocol import ErrorKind, Refusal, RequestError
from serving.messages import BatchReply, ForwardPass, InferenceOutcome, InferenceRequest
from serving.queues import DeadlineClassQueue, FifoQueue, create_request_queue
from serving.scheduler import EmbodimentScheduler


class FakeReplicas:
    """`replicas` workers, each a forward pass of fixed_ms + per_sample_ms * n after a round trip of call_ms;
    records every batch (model, requests) as a worker takes it. A request past its deadline when its pass starts
    is skipped, as a real replica does."""

    def __init__(self, fixed_ms: float, per_sample_ms: float, replicas: int = 1, max_batch_size: int = 8,
                 call_ms: float = 1.0):
        self.fixed_ms, self.per_sample_ms, self.call_ms = fixed_ms, per_sample_ms, call_ms
        self.max_batch_size = max_batch_size
        self._workers = asyncio.Semaphore(replicas)
        self._free = list(range(replicas))
        self.batches: list[tuple[str, list[InferenceRequest]]] = []

    def forward_ms(self, n: int) -> float:
        return self.fixed_ms + self.per_sample_ms * n

    def send(self, model: str, requests: list[InferenceRequest], load: dict[str, float]):
        return self._serve(model, requests)

    async def _serve(self, model: str, requests: list[InferenceRequest]) -> BatchReply:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.call_ms / 2000.0)
        async with self._workers:
            worker = self._free.pop()
            try:
                self.batches.append((model, requests))
                start = loop.time()
                live = [r for r in requests if r.deadline is None or r.deadline > start]
                n = sum(r.samples for r in live)
                await asyncio.sleep(self.forward_ms(n) / 1000.0)
            finally:
                self._free.append(worker)
        outcomes = [InferenceOutcome({"id": r.observation["id"], "model": model}, {}) if r in live else
                    InferenceOutcome(None, {}, "deadline exceeded: before its pass", "deadline",
                                     Refusal.EXPIRED_ON_REPLICA.value) for r in requests]
        await asyncio.sleep(self.call_ms / 2000.0)
        return BatchReply(outcomes, f"fake-{worker}", self.max_batch_size, 0.0,
                          [ForwardPass(start, self.forward_ms(n), n)], [0] * len(requests))

    def ids(self, since: int = 0) -> list[list[int]]:
        return [[r.observation["id"] for r in batch] for _, batch in self.batches[since:]]


def request(tag: int = 0, samples: int = 1) -> InferenceRequest:
    return InferenceRequest({"id": tag}, None, samples)


def scheduler(fake: FakeReplicas, **kw) -> EmbodimentScheduler:
    kw.setdefault("max_batch_size", fake.max_batch_size)
    return EmbodimentScheduler("gr1", fake.send, clock=simtime.clock(), **kw)


async def ask(s: EmbodimentScheduler, tag: int = 0, budget_s: float = 5.0, model: str = "default", samples: int = 1):
    now = asyncio.get_running_loop().time()
    return await s.submit(request(tag, samples), model, now, now + budget_s)


async def warm(s: EmbodimentScheduler) -> None:
    """A few batches of different sizes, so the forward-time model has seen the curve."""
    for size in (1, 4, 2, 8, 1, 3):
        await asyncio.gather(*(ask(s) for _ in range(size)))


# --- a lone robot -----------------------------------------------------------------------------------------


def test_a_lone_request_leaves_in_the_call_that_admits_it_and_waits_on_no_timer():
    async def main():
        fake = FakeReplicas(20.0, 5.0, call_ms=2.0)
        s = scheduler(fake, batch_wait_ms=2000.0)
        loop = asyncio.get_running_loop()
        for i in range(3):
            t0 = loop.time()
            future = s.submit(request(i), "default", t0, t0 + 5.0)
            assert s.inflight == 1 and s.queued == 0  # sent before submit returned
            got = await future
            # exactly the round trip and the forward pass: no batch wait, no timer, whatever batch_wait_ms says
            assert loop.time() - t0 == pytest.approx((2.0 + 25.0) / 1000.0)
            assert got.outcome.error is None and got.batch_size == 1 and got.queue_ms == pytest.approx(1.0)
        await s.close()

    simtime.run(main)


def test_while_a_batch_travels_the_next_waits_batch_wait_ms_for_the_robots_it_answers():
    async def main():
        fake = FakeReplicas(30.0, 1.0, replicas=2, call_ms=0.0)
        s = scheduler(fake, batch_wait_ms=5.0)
        s.observe_replicas(2)
        first = asyncio.ensure_future(ask(s, 0))
        await asyncio.sleep(0.001)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        second = asyncio.ensure_future(ask(s, 1))
        await asyncio.sleep(0.002)
        third = asyncio.ensure_future(ask(s, 2))  # arrives within the wait: rides with the second
        await asyncio.gather(first, second, third)
        assert fake.ids() == [[0], [1, 2]]
        assert fake.batches and s.stats()["on_time"] == 3
        assert loop.time() - t0 == pytest.approx(0.005 + 0.032)
        await s.close()

    simtime.run(main)


# --- order and admission ------------------------------------------------------------------------------------


def test_edf_serves_the_earliest_deadline_first():
    async def main():
        fake = FakeReplicas(30.0, 1.0, max_batch_size=2)
        s = scheduler(fake, batch_wait_ms=0.0)
        await warm(s)  # once it knows the forward time: one batch per replica in flight, the rest wait
        warm_batches = len(fake.batches)
        blocker = asyncio.ensure_future(ask(s, -1))  # occupies the replica
        await asyncio.sleep(0.005)
        tasks = [asyncio.ensure_future(ask(s, i, budget)) for i, budget in enumerate([4.0, 1.0, 3.0, 2.0])]
        await asyncio.gather(blocker, *tasks)
        assert fake.ids(warm_batches) == [[-1], [1, 3], [2, 0]]  # by deadline, not by arrival
        await s.close()

    simtime.run(main)


def test_fifo_still_batches_oldest_first():
    async def main():
        fake = FakeReplicas(30.0, 1.0, max_batch_size=2)
        s = scheduler(fake, batch_wait_ms=0.0, max_inflight=1, policy="fifo")
        blocker = asyncio.ensure_future(ask(s, -1))
        await asyncio.sleep(0.005)
        tasks = [asyncio.ensure_future(ask(s, i, budget)) for i, budget in enumerate([4.0, 1.0, 3.0])]
        await asyncio.gather(blocker, *tasks)
        assert fake.ids(1) == [[0, 1], [2]]
        await s.close()

    simtime.run(main)


def test_queue_policies_are_chosen_once_by_name():
    assert isinstance(create_request_queue("edf"), DeadlineClassQueue)
    assert isinstance(create_request_queue("fifo"), FifoQueue)
    with pytest.raises(ValueError, match="scheduler: expected one of 'edf', 'fifo', got 'lifo'"):
        create_request_queue("lifo")


def test_a_request_that_cannot_make_its_deadline_is_refused_at_once_saying_why():
    async def main():
        s = scheduler(FakeReplicas(50.0, 10.0))
        await warm(s)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(RequestError) as err:
            s.submit(request(), "default", t0, t0 + 0.020)  # a forward pass alone takes 60 ms
        assert err.value.kind is ErrorKind.DEADLINE and err.value.reason is Refusal.REFUSED_EARLY
        assert "predicted" in str(err.value) and "allows 20 ms" in str(err.value)  # for people
        assert s.counts["refused_early"] == 1 and s.queued == 0
        await s.close()

    simtime.run(main)


def test_a_buffer_due_orders_the_queue_but_never_refuses():
    """A robot whose buffer runs dry sooner is served first, and one due before any pass could end is queued
    (it stands still until its action comes), not refused: only the deadline refuses."""
    async def main():
        fake = FakeReplicas(50.0, 10.0, max_batch_size=1)
        s = scheduler(fake, batch_wait_ms=0.0, max_batch_size=1)
        await warm(s)
        warm_batches = len(fake.batches)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        blocker = asyncio.ensure_future(s.submit(request(-1), "default", t0, t0 + 5.0))  # holds the replica
        await asyncio.sleep(0.005)
        t1 = loop.time()
        later = asyncio.ensure_future(s.submit(request(0), "default", t1, t1 + 5.0, due=t1 + 3.0))
        sooner = asyncio.ensure_future(s.submit(request(1), "default", t1, t1 + 5.0, due=t1 + 0.010))
        await asyncio.gather(blocker, later, sooner)
        assert fake.ids(warm_batches) == [[-1], [1], [0]]
        assert s.counts["refused_early"] == 0
        await s.close()

    simtime.run(main)


def test_a_full_queue_refuses_at_once_as_overloaded():
    async def main():
        fake = FakeReplicas(100.0, 1.0)
        s = scheduler(fake, max_queued=2, max_inflight=1, batch_wait_ms=0.0, max_batch_size=1)
        waiting = [asyncio.ensure_future(ask(s, i)) for i in range(3)]  # one in flight, two queued
        await asyncio.sleep(0)
        with pytest.raises(RequestError) as err:
            await ask(s, 9)
        assert err.value.kind is ErrorKind.OVERLOADED and err.value.reason is Refusal.OVERLOADED
        assert "max_queued_requests=2" in str(err.value)
        await asyncio.gather(*waiting)
        assert s.counts["overloaded"] == 1
        await s.close()

    simtime.run(main)


def test_expiry_says_whether_the_request_waited_or_was_on_a_replica():
    async def main():
        fake = FakeReplicas(500.0, 0.0, call_ms=0.0)  # one 500 ms pass at a time
        s = scheduler(fake, max_inflight=1, batch_wait_ms=0.0, max_batch_size=1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        on_replica = s.submit(request(0), "default", t0, t0 + 0.4)  # sent at once, its pass outlasts it
        waiting = s.submit(request(1), "default", t0, t0 + 0.3)  # never leaves the queue in time
        for future, reason, at in ((waiting, Refusal.EXPIRED_WAITING, 0.3), (on_replica, Refusal.EXPIRED_ON_REPLICA, 0.4)):
            with pytest.raises(RequestError) as err:
                await future
            assert err.value.kind is ErrorKind.DEADLINE and err.value.reason is reason
            assert loop.time() == pytest.approx(t0 + at)  # heard at its deadline, not after
        assert s.counts["expired"] == 2 and s.counts["expired_on_replica"] == 1 and s.counts["expired_waiting"] == 1
        await s.close()

    simtime.run(main)


def test_a_tight_request_goes_before_a_loose_one_whose_deadline_is_earlier():
    async def main():
        fake = FakeReplicas(50.0, 10.0, max_batch_size=1)
        s = scheduler(fake, batch_wait_ms=0.0)
        await warm(s)
        warm_batches = len(fake.batches)
        loop = asyncio.get_running_loop()
        now = loop.time()
        busy = asyncio.ensure_future(s.submit(request(0), "default", now, now + 5.0))  # holds the one replica
        await asyncio.sleep(0.001)
        # a loose request that has waited 3.9 s of its 4 s, then a tight one of 0.5 s that just came
        loose = asyncio.ensure_future(s.submit(request(1), "default", now - 3.9, now + 0.4))
        tight = asyncio.ensure_future(s.submit(request(2), "default", now, now + 0.5))
        await asyncio.gather(busy, loose, tight)
        # deadline order would send the loose one first; the tighter class goes first (both make it here)
        assert fake.ids(warm_batches) == [[0], [2], [1]]
        await s.close()

    simtime.run(main)


# --- the models of one embodiment; cold loads ------------------------------------------------------------------


def test_models_of_one_embodiment_share_its_queue_earliest_deadline_first_never_mixed():
    async def main():
        fake = FakeReplicas(30.0, 1.0, max_batch_size=4)
        s = scheduler(fake, batch_wait_ms=0.0, max_inflight=1)
        blocker = asyncio.ensure_future(ask(s, -1))  # occupies the one replica
        await asyncio.sleep(0.001)
        late = [asyncio.ensure_future(ask(s, i, 3.0)) for i in (0, 1)]
        early = asyncio.ensure_future(ask(s, 2, 1.0, model="ft"))
        await asyncio.gather(blocker, early, *late)
        # one batch at a time over both models (one replica), the fine-tune's earlier deadline first
        assert [(model, [r.observation["id"] for r in batch]) for model, batch in fake.batches] == [
            ("default", [-1]), ("ft", [2]), ("default", [0, 1])]
        load = s.load()
        assert load["demand_samples_per_s"] == pytest.approx(s.demand_samples_per_s())
        await s.close()

    simtime.run(main)


def test_a_cold_load_counts_in_the_prediction():
    async def main():
        held = {"ft": True}
        s = EmbodimentScheduler("gr1", FakeReplicas(20.0, 5.0).send, clock=simtime.clock(),
                                holds_model=lambda model: held.get(model, True))
        await warm(s)
        s.observe_cold_load(400.0)  # as the replicas measured loading a fine-tune
        assert (await ask(s, budget_s=0.2, model="ft")).outcome.error is None  # resident: ~26 ms
        held["ft"] = False  # evicted everywhere: 400 ms of loading before the forward pass
        with pytest.raises(RequestError, match=r"refused early, predicted 4\d\d ms") as err:
            await ask(s, budget_s=0.2, model="ft")
        assert err.value.reason is Refusal.REFUSED_EARLY
        assert (await ask(s, budget_s=0.2)).outcome.error is None  # the default model: no cold load
        await s.close()

    simtime.run(main)


def test_the_scheduler_reports_demand_and_the_replicas_it_needs():
    async def main():
        s = scheduler(FakeReplicas(20.0, 5.0, call_ms=0.0))
        await warm(s)
        load = s.load()
        assert load["capacity_samples_per_s"] == pytest.approx(8 / 0.060, rel=0.05)  # full batch: 20 + 5 x 8 ms
        assert load["demand_samples_per_s"] > 0 and load["replicas_needed"] > 0
        s.observe_fleet(3)
        assert s.load()["busy_replicas"] == 3.0
        await s.close()

    simtime.run(main)


# --- overload: what the scheduler exists for ---------------------------------------------------------------------


async def _overload(policy: str, seconds: float = 4.0) -> dict:
    """80 robots, each one request outstanding, resending at once: several times what 2 replicas serve."""
    fake = FakeReplicas(60.0, 15.0, replicas=2, max_batch_size=8)  # full batch 180 ms: ~90 samples/s for two
    s = scheduler(fake, batch_wait_ms=1.0, policy=policy)
    s.observe_replicas(2)
    loop = asyncio.get_running_loop()
    stats = {"on_time": 0, "tight_on_time": 0, "late": 0, "refused": 0, "expired": 0, "overdue": 0.0}

    async def robot(i: int, stop: float):
        budget = 0.5 if i % 2 else 1.5
        while loop.time() < stop:
            received = loop.time()
            deadline = received + budget
            try:
                await s.submit(request(i), "default", received, deadline)
                stats["on_time" if loop.time() <= deadline else "late"] += 1
                stats["tight_on_time"] += budget < 1.0 and loop.time() <= deadline
                stats["overdue"] = max(stats["overdue"], loop.time() - deadline)
            except RequestError as exc:
                stats["expired" if exc.reason in (Refusal.EXPIRED_WAITING, Refusal.EXPIRED_ON_REPLICA) else "refused"] += 1
                stats["overdue"] = max(stats["overdue"], loop.time() - deadline)
                await asyncio.sleep(0.05)  # the robot takes a fresh observation

    await warm(s)
    stop = loop.time() + seconds
    await asyncio.gather(*(robot(i, stop) for i in range(80)))
    await s.close()
    return stats


def test_under_overload_edf_serves_on_time_and_refuses_the_excess_early():
    edf, fifo = simtime.run(lambda: _overload("edf")), simtime.run(lambda: _overload("fifo"))
    assert edf["late"] == 0 and fifo["late"] == 0  # never an action after its deadline
    assert edf["overdue"] <= 1e-9 and fifo["overdue"] <= 1e-9  # every request answered by its deadline, to the tick
    assert edf["refused"] > 0  # the excess heard early
    assert edf["expired"] < edf["refused"]  # ... rather than waiting out its budget
    # The comparison the scheduler exists for: the tight class served instead of expiring behind the loose one,
    # without giving up the total.
    assert edf["tight_on_time"] > 2 * fifo["tight_on_time"] + 10, (edf, fifo)
    assert edf["on_time"] > 0.8 * fifo["on_time"], (edf, fifo)


async def _tight_and_loose(policy: str, seconds: float = 4.0) -> dict:
    """Loose robots flood two replicas whose full batch (16) takes 340 ms; a few tight robots need 250 ms."""
    fake = FakeReplicas(20.0, 20.0, replicas=2, max_batch_size=16)
    s = scheduler(fake, batch_wait_ms=1.0, policy=policy)
    s.observe_replicas(2)
    loop = asyncio.get_running_loop()
    stats = {"tight_sent": 0, "tight_on_time": 0, "loose_on_time": 0, "late": 0}

    async def robot(i: int, budget: float, period: float, stop: float):
        await asyncio.sleep(period * i / 3 % period if period else 0.0)  # robots are not in phase
        while loop.time() < stop:
            received = loop.time()
            try:
                await s.submit(request(i), "default", received, received + budget)
                ok = loop.time() <= received + budget
                stats["late"] += not ok
                stats["tight_on_time" if budget < 1.0 else "loose_on_time"] += ok
            except RequestError:
                pass
            stats["tight_sent"] += budget < 1.0
            await asyncio.sleep(max(0.0, received + period - loop.time()))

    await warm(s)
    stop = loop.time() + seconds
    await asyncio.gather(*(robot(i, 3.0, 0.0, stop) for i in range(60)),
                         *(robot(100 + i, 0.25, 0.3, stop) for i in range(3)))
    await s.close()
    return stats


def test_tight_robots_keep_their_deadlines_while_loose_ones_flood():
    edf, fifo = simtime.run(lambda: _tight_and_loose("edf")), simtime.run(lambda: _tight_and_loose("fifo"))
    assert edf["late"] == 0 and edf["tight_sent"] >= 30
    assert edf["tight_on_time"] >= 0.9 * edf["tight_sent"], (edf, fifo)
    assert fifo["tight_on_time"] <= 0.1 * fifo["tight_sent"], (edf, fifo)  # they queue behind the flood
    assert edf["loose_on_time"] > 5 * edf["tight_on_time"]  # the loose ones still get the capacity


def test_the_same_traffic_gives_the_same_outcome_every_time():
    assert simtime.run(lambda: _overload("edf", 1.0)) == simtime.run(lambda: _overload("edf", 1.0))


# --- deadlines from config --------------------------------------------------------------------------------------


def test_deadline_comes_from_options_then_port_then_embodiment_then_timeout():
    from serving.config import FleetArgs

    args = FleetArgs.model_validate({
        "ingress": {"ports": [{"port": 5555, "embodiment": "gr1", "slo_ms": 300},
                              {"port": 5556, "embodiment": "gr1"}], "request_timeout_ms": 5000},
        "embodiments": {"gr1": {"checkpoint": "/x", "slo_ms": 800}, "g1": {"checkpoint": "/y"}},
    })
    gr1, g1 = args.embodiments["gr1"].admission(args.ingress), args.embodiments["g1"].admission(args.ingress)
    assert gr1.deadline_ms(100.0, 300.0) == 100.0  # options.deadline_ms first
    assert gr1.deadline_ms(None, 300.0) == 300.0  # the port's slo_ms
    assert gr1.deadline_ms(None, None) == 800.0  # the embodiment's
    assert g1.deadline_ms(None, None) == 5000.0  # request_timeout_ms
    assert gr1.deadline_ms(60_000.0, None) == 5000.0  # never past request_timeout_ms
    assert "slo_ms" not in args.embodiments["gr1"].policy_config().model_dump()


def test_slo_and_scheduler_config_errors_name_the_field():
    from pydantic import ValidationError

    from serving.config import FleetArgs

    with pytest.raises(ValidationError, match="slo_ms"):
        FleetArgs.model_validate({"embodiments": {"gr1": {"checkpoint": "/x", "slo_ms": 0}},
                                  "ingress": {"ports": [{"port": 5555, "embodiment": "gr1"}]}})
    with pytest.raises(ValidationError, match="scheduler"):
        FleetArgs.model_validate({"embodiments": {"gr1": {"checkpoint": "/x"}},
                                  "ingress": {"ports": [{"port": 5555, "embodiment": "gr1"}], "scheduler": "lifo"}})


def test_after_a_stall_the_replica_frees_when_its_batches_do_not_when_the_stall_predicted():
    """A few passes 100x slow (another process took the cores), then fast again, robots in a closed loop
    throughout on one replica with two batches in flight. The batches sent while the long passes were
    predicted come back fast; a replica's free time is recomputed from the batches still out, so the
    predictions fall back with the passes and no robot is refused (once, a stale end carried from batch to
    batch grew to the whole budget and refused every robot)."""

    async def main():
        fake = FakeReplicas(10.0, 1.0, replicas=1, max_batch_size=2, call_ms=1.0)
        s = scheduler(fake, max_inflight=2)
        await warm(s)
        loop = asyncio.get_running_loop()
        refused: list[str] = []

        async def robot(i: int, until: float) -> None:
            while loop.time() < until:
                try:
                    await ask(s, i, budget_s=3.0)
                except RequestError as exc:
                    refused.append(str(exc))
                    await asyncio.sleep(0.05)

        end = loop.time() + 30.0
        robots = [asyncio.ensure_future(robot(i, end)) for i in range(4)]
        await asyncio.sleep(1.0)
        fake.fixed_ms = 1000.0  # the stall
        await asyncio.sleep(8.0)
        fake.fixed_ms = 10.0
        await asyncio.sleep(5.0)  # recovered
        refused.clear()
        await asyncio.gather(*robots)
        assert refused == [], refused[:3]
        assert s.stats()["forward_model"]["fixed_ms"] < 100.0
        await s.close()

    simtime.run(main)
