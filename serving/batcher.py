"""Micro-batching in the ingress: concurrent robots of one embodiment share ONE Ray call.

A Ray call per request costs more than a small model's forward pass on a small machine (BENCHMARKS.md: 269 vs
1948 req/s for 32 robots), so requests queue
here per embodiment and leave in batches. Two schedulers (`ingress.scheduler`):

- `edf` (default): deadline-aware. The queue is ordered by deadline class, then deadline (the tighter class
  first, earliest deadline first within a class: `serving.scheduler.budget_class`). A batch leaves when a
  replica is free (at most one batch per replica in flight, so the queue stays here where deadlines are
  known), sized by `serving.scheduler` to the largest batch whose predicted completion (its tail time:
  one pass in ten runs longer than the mean) still meets the earliest deadline in it; while the robots ask
  for a tighter class, batches are also kept short enough that some replica always frees within that class's
  reach (`_batch_cap`). A request predicted to miss its deadline is refused at once with a `deadline` error
  giving the predicted and the allowed time.
- `fifo` (the previous scheduler, kept for comparison): as many samples as are waiting, up to
  `max_batch_size`, oldest first, at most `max_inflight` batches travelling at once; a request waits until
  its deadline before it hears it was too late.

Both send at once to an idle replica (no added wait for a lone robot) and wait `batch_wait_ms` only while
another batch is in flight, so robots answered together ride together again.

The batchers of one embodiment (one per model) plan against its replicas together (`serving.replica_pool`):
a free replica takes the embodiment's first request in queue order whatever its model; a request is admitted
only if it makes its deadline behind the work queued ahead of it AND the tighter-deadline work expected to
arrive and pass it (so under overload the loose robots' backlog leaves room for the tight ones instead of ageing
into their urgency); and a fine-tune that no replica holds counts its cold load in every prediction.
"""

from __future__ import annotations

import asyncio
import time
import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ray.exceptions import ActorUnavailableError, RayActorError

from serving.messages import BatchReply, InferenceOutcome, InferenceRequest
from serving.protocol import RequestError
from serving.replica_pool import ReplicaPool
from serving.scheduler import (
    ForwardTimeModel,
    budget_class,
    plan_batch,
    predict_completion,
    predicted_late,
    service_ms,
)

# A replica that died or restarts mid-call: get_action is idempotent, so the batch is sent again, until the
# requests' deadline: a replica restart (reloading its checkpoint) takes seconds, not milliseconds.
RETRYABLE = (RayActorError, ActorUnavailableError)
MAX_BACKOFF_S = 1.0
REACH_MARGIN = 0.1  # of the tight budget: kept free of the reach, for the predictions' error
OVERHEAD_FIRST_CAP_MS = 50.0  # a Ray call's own cost is a few ms; the first call can include a cold start
STACKED_S = 0.1  # a batch whose forward pass starts this long after it was sent waited behind another


@dataclass
class _Pending:
    request: InferenceRequest
    received: float  # time.time() at the ingress
    deadline: float  # time.time() past which the robot gets "deadline exceeded" instead of an action
    seq: int = 0  # arrival order: ties of deadline go oldest first
    queued: float = 0.0  # time.time() when it joined the queue (a request's trace)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # Queue order: the tighter deadline class first (its budget to two digits), then the earliest deadline.
    key: tuple[float, float, int] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (budget_class(self.deadline - self.received), self.deadline, self.seq)

    @property
    def abandoned(self) -> bool:
        """Answered already (its deadline passed while it waited): not worth a place in a batch."""
        return self.future.done()

    @property
    def samples(self) -> int:
        return self.request.samples

    def __lt__(self, other: "_Pending") -> bool:
        return self.key < other.key


@dataclass
class Delivered:
    """An outcome with the timings the ingress reports in info["server"]."""

    outcome: InferenceOutcome
    replica: str
    batch_size: int
    queue_ms: float
    infer_ms: float
    predicted_ms: float | None = None  # the scheduler's prediction of this batch's forward pass (edf)
    trace: dict[str, float] | None = None  # queued, sent, back and the replica's hops (epoch s)


class EmbodimentBatcher:
    def __init__(
        self,
        tag: str,
        send: Callable[..., Awaitable[BatchReply]],
        *,
        max_batch_size: int = 16,
        batch_wait_ms: float = 2.0,
        max_inflight: int = 4,
        max_queued: int = 512,
        scheduler: str = "edf",
        with_load: bool = False,
        pool: ReplicaPool | None = None,
        resident: Callable[[], bool] | None = None,
    ):
        if scheduler not in ("edf", "fifo"):
            raise ValueError(f"scheduler: expected 'edf' or 'fifo', got {scheduler!r}")
        self.tag = tag
        self._send = send
        self._with_load = with_load  # send(requests, load): the demand report autoscaling reads (see load())
        self.scheduler = scheduler
        self.max_batch_size = max_batch_size
        self.batch_wait_ms = batch_wait_ms
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_inflight)
        self._inflight: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        # fifo
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None  # the request that did not fit in the last batch
        # edf
        self._sorted: list[_Pending] = []  # waiting requests in queue order (_Pending.key)
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self.model = ForwardTimeModel()
        self.overhead_ms = 0.0  # a batch call's time beyond its forward pass (Ray hops, (de)serialisation)
        # The embodiment's replicas, shared with the batchers of its other models; its own pool when alone.
        self.pool = pool if pool is not None else ReplicaPool(tag)
        self.pool.join(self)
        self._resident = resident  # whether some replica holds this batcher's model (None: always, the default)
        # demand (samples/s arriving, refused or not) over a sliding pair of windows, for autoscaling
        self._window_start = time.time()
        self._window_samples = 0
        self._last_rate = 0.0
        self.counts = {"refused_early": 0, "expired": 0, "expired_waiting": 0, "on_time": 0, "waited_at_replica": 0}

    def start(self) -> None:
        run = self._run_edf if self.scheduler == "edf" else self._run_fifo
        self._task = asyncio.get_running_loop().create_task(run(), name=f"batcher-{self.tag}")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        if self.scheduler == "edf":
            return len(self._sorted)
        return self._queue.qsize() + (self._carry is not None)

    @property
    def queued_samples(self) -> int:
        return sum(p.samples for p in self._sorted) if self.scheduler == "edf" else self.queued

    def wake(self) -> None:
        self._wake.set()

    def samples_ahead_of(self, key: tuple) -> int:
        """Samples waiting here that go before a request of queue order `key` (edf)."""
        ahead = 0
        for p in self._sorted:
            if p.key >= key:
                break
            if not p.abandoned:
                ahead += p.samples
        return ahead

    def head_key(self) -> tuple | None:
        """The queue order of the first request waiting here (edf), None when nothing waits."""
        while self._sorted and self._sorted[0].abandoned:
            self._sorted.pop(0)
        return self._sorted[0].key if self._sorted else None

    # --- capacity ---------------------------------------------------------------------------------------

    def set_replicas(self, n: int) -> None:
        """How many replicas serve this batcher's deployment (the ingress reads it from Serve)."""
        self.pool.set_replicas(n)

    @property
    def replicas(self) -> int:
        return self.pool.replicas

    def _edf_slots(self) -> int:
        """Batches in flight: one per replica, plus one waiting behind each when the round trip to the replica
        is a noticeable share of a forward pass (a small model), so a replica that finishes starts the next at
        once. Not more: a batch sent ahead is a commitment that a later, more urgent request cannot pass. Each
        waiting batch is planned from its predicted start (see _free_at). At most max_inflight_batches."""
        full = self.model.predict(self.max_batch_size)
        if full is None:
            return self.max_inflight
        depth = 1 + max(0, math.ceil(self.overhead_ms / max(full, 1e-3) - 0.1))
        return max(1, min(self.max_inflight, self.replicas * min(depth, 2)))

    def _free_at(self, now: float) -> list[float]:
        """When each replica of the embodiment finishes what it runs now (predicted); `now` for idle ones."""
        return self.pool.free_at(now)

    def _call_overhead_ms(self) -> float:
        """A batch call's predicted time beyond its forward pass: the Ray hops, and a cold load when no
        replica holds this model and no batch of it is on its way (measured by the replicas: predictable)."""
        cold = self._resident is not None and not self._inflight and not self._resident()
        return self.overhead_ms + (self.pool.cold_load_ms if cold else 0.0)

    def _reach_s(self, now: float, overhead_ms: float) -> float | None:
        """How long a request of the tightest class can wait for a free replica and still make its deadline:
        its budget less its own batch (itself and the tight requests arriving while it waits) and a margin.
        None when no class is tighter than the others, or when even a free replica could not serve it."""
        tight = self.pool.tightest_class(now)
        alone = service_ms(self.model, 1, overhead_ms, tail=True)
        if tight is None or alone is None:
            return None
        budget, rate = tight
        per_sample_s = self.model.per_sample_ms / 1000.0
        reach = (budget * (1.0 - REACH_MARGIN) - alone / 1000.0) / (1.0 + per_sample_s * rate)
        return reach if reach > 0 else None

    def _largest_batch_within(self, seconds: float, overhead_ms: float) -> int:
        """The most samples (at least 1, at most max_batch_size) whose predicted service fits in `seconds`."""
        fixed = self.model.fixed_ms + overhead_ms
        per = max(self.model.per_sample_ms, 1e-6)
        return max(1, min(self.max_batch_size, int((seconds * 1000.0 - fixed) / per)))

    def _batch_cap(self, start: float, others: list[float], overhead_ms: float) -> int:
        """Samples the batch starting at `start` may carry (edf).

        Without preemption, a tight request is served when the next replica frees: so while the robots ask for
        a tight class, no gap between two replicas freeing may outgrow its reach. This batch ends after the
        last of the others, so it must end within the reach of that one; the replicas fall into step, each
        freeing about reach / replicas after the previous, and a batch lasts up to replicas x reach: small
        enough to keep the tight class, long enough to keep the throughput of batching."""
        reach = self._reach_s(start, overhead_ms)
        if reach is None:
            return self.max_batch_size
        end_by = max([start, *others]) + reach
        return self._largest_batch_within(end_by - start, overhead_ms)

    def _steady_batch_size(self, now: float, overhead_ms: float) -> int:
        """The batch size the replicas settle at under load (what admission plans the queue ahead with)."""
        reach = self._reach_s(now, overhead_ms)
        if reach is None:
            return self.max_batch_size
        return self._largest_batch_within(self.replicas * reach, overhead_ms)

    def _note_arrival(self, samples: int) -> None:
        now = time.time()
        self._window_samples += samples
        elapsed = now - self._window_start
        if elapsed >= 2.0:
            self._last_rate = self._window_samples / elapsed
            self._window_start, self._window_samples = now, 0

    def demand_samples_per_s(self) -> float:
        now = time.time()
        elapsed = now - self._window_start
        if elapsed >= 4.0:  # nothing arrived for two windows: no demand
            return self._window_samples / elapsed
        current = self._window_samples / max(elapsed, 0.5)  # the first half second alone would overshoot
        return max(self._last_rate, current)

    def load(self) -> dict[str, float]:
        """What autoscaling needs to know about the embodiment's demand, all models (sent with each batch)."""
        return self.pool.load()

    # --- submit -----------------------------------------------------------------------------------------

    async def submit(self, request: InferenceRequest, received: float, deadline: float) -> Delivered:
        """The outcome of `request`, or a RequestError: overloaded or predicted late (at once), or deadline
        exceeded (at the deadline at the latest: a late action never reaches the robot)."""
        self._note_arrival(request.samples)
        if self.queued >= self.max_queued:
            raise RequestError(
                f"overloaded: {self.queued} get_action requests for {self.tag!r} are already waiting "
                f"(max_queued_requests={self.max_queued}); retry later",
                "overloaded",
            )
        request.deadline = deadline
        self.pool.note_arrival(deadline - received, request.samples, received)
        pending = _Pending(request, received, deadline, next(self._seq))
        if self.scheduler == "edf":
            self._admit(pending)
            bisect.insort(self._sorted, pending)
            self._wake.set()
        else:
            self._queue.put_nowait(pending)
        pending.queued = time.time()
        try:
            delivered = await asyncio.wait_for(asyncio.shield(pending.future), max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            pending.future.cancel()  # a late action must never reach the robot; the batcher skips it
            self.counts["expired"] += 1
            # Expired waiting (the queue or its order misjudged) or on a replica (a forward pass ran long)?
            self.counts["expired_waiting"] += any(p is pending for p in self._sorted)
            raise RequestError(
                f"deadline exceeded: no action for {self.tag!r} within {(deadline - received) * 1000:.0f} ms "
                f"({self.queued} waiting, {len(self._inflight)} batches in flight)",
                "deadline",
            ) from None
        if isinstance(delivered, RequestError):  # refused by the scheduler after it was queued
            raise delivered
        if time.time() > deadline:  # the reply came as the deadline passed: still late, never delivered
            self.counts["expired"] += 1
            raise RequestError(
                f"deadline exceeded: the action for {self.tag!r} came {(time.time() - deadline) * 1000:.0f} ms "
                f"after the {(deadline - received) * 1000:.0f} ms deadline", "deadline")
        return delivered

    def _late_error(self, pending: _Pending, predicted_done: float, now: float) -> RequestError:
        self.counts["refused_early"] += 1
        return RequestError(
            f"deadline: refused early, predicted {(predicted_done - pending.received) * 1000:.0f} ms to an action "
            f"for {self.tag!r} but the deadline allows {(pending.deadline - pending.received) * 1000:.0f} ms "
            f"({self.queued} waiting on {self.replicas} replica(s)); resend a fresh observation",
            "deadline",
        )

    def _admit(self, pending: _Pending) -> None:
        """Refuse at once a request predicted to complete after its deadline (edf)."""
        if not self.model.ready:
            return
        now = time.time()
        # Everything before it in queue order goes first, whatever its model
        ahead = sum(b.samples_ahead_of(pending.key) for b in self.pool.batchers)
        ahead += round(self.pool.expected_tighter_samples(pending.deadline - pending.received, pending.deadline, now))
        overhead_ms = self._call_overhead_ms()
        done = predict_completion(ahead, pending.samples, self._free_at(now), now, self.model, overhead_ms,
                                  self._steady_batch_size(now, overhead_ms))
        if done is not None and done > pending.deadline:
            raise self._late_error(pending, done, now)

    # --- edf --------------------------------------------------------------------------------------------

    def _shed(self, now: float) -> None:
        """Refuse at once the waiting requests that the queue ahead of them makes late (predicted)."""
        self._sorted = [p for p in self._sorted if not p.abandoned]
        overhead_ms = self._call_overhead_ms()
        late = predicted_late(self._sorted, self._free_at(now), self.model, overhead_ms,
                              self._steady_batch_size(now, overhead_ms))
        if not late:
            return
        gone = {id(p) for p, _ in late}
        for p, done in late:
            p.future.set_result(self._late_error(p, done, now))
        self._sorted = [p for p in self._sorted if id(p) not in gone]

    async def _run_edf(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            self._sorted = [p for p in self._sorted if not p.abandoned]
            # A replica takes the embodiment's first request in queue order, whichever model's batcher holds it.
            if (not self._sorted or self.pool.inflight >= self._edf_slots()
                    or not self.pool.first_in_line(self)):
                await self._wake.wait()
                continue
            if self.pool.inflight and self.batch_wait_ms > 0 and self.queued_samples < self.max_batch_size:
                # Another batch travels: wait a little for the robots it answered with ours, not past any slack.
                slack = min(p.deadline for p in self._sorted) - time.time()
                await asyncio.sleep(max(0.0, min(self.batch_wait_ms / 1000.0, slack / 4)))
                self._sorted = [p for p in self._sorted if not p.abandoned]
                if not self._sorted or self.pool.inflight >= self._edf_slots():
                    continue
            now = time.time()
            overhead_ms = self._call_overhead_ms()
            # The batch starts now on an idle replica, else when the first busy one is predicted to be free.
            start, *others = self._free_at(now)
            plan = plan_batch(self._sorted, start, self.model, overhead_ms,
                              self._batch_cap(start, others, overhead_ms), others)
            taken = {id(p) for p in plan.batch} | {id(p) for p in plan.refuse}
            self._sorted = [p for p in self._sorted if id(p) not in taken]
            for p in plan.refuse:
                alone_ms = service_ms(self.model, p.samples, overhead_ms, tail=True) or 0.0
                p.future.set_result(self._late_error(p, start + alone_ms / 1000.0, now))
            if plan.batch:
                await self._slots.acquire()
                forward_ms = self.model.predict(sum(p.samples for p in plan.batch))  # reported against infer_ms
                # A batch sent behind a running one waits at the replica: its call time is not overhead.
                task = loop.create_task(self._dispatch(plan.batch, forward_ms, learn_overhead=start <= now))
                self._inflight.add(task)
                self.pool.busy_until[task] = start + (plan.predicted_ms or 0.0) / 1000.0
                task.add_done_callback(self._batch_done)
                self._shed(now)
            self.pool.notify()  # the head moved: another model's batcher may be first in line now

    def _batch_done(self, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        self.pool.busy_until.pop(task, None)
        self.pool.notify()

    # --- fifo (the previous scheduler) ----------------------------------------------------------------

    async def _next(self, timeout: float | None) -> _Pending | None:
        """The next live request (abandoned ones are dropped), waiting at most `timeout` (None: forever)."""
        loop = asyncio.get_running_loop()
        close_at = None if timeout is None else loop.time() + timeout
        while True:
            if self._carry is not None:
                item, self._carry = self._carry, None
            elif not self._queue.empty():
                item = self._queue.get_nowait()
            elif close_at is None:
                item = await self._queue.get()
            else:
                remaining = close_at - loop.time()
                if remaining <= 0:
                    return None
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    return None
            if not item.abandoned:
                return item

    async def _run_fifo(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # wait for a slot first: meanwhile the queue grows into a batch
            first = await self._next(None)
            batch, samples = [first], first.request.samples
            # With none of our batches in flight the replicas are idle: waiting would only add latency, so take
            # what is queued and go. While one travels, waiting a little gathers the robots that follow.
            wait_s = self.batch_wait_ms / 1000.0 if self._inflight else 0.0
            close_at = loop.time() + wait_s
            while samples < self.max_batch_size:
                item = await self._next(close_at - loop.time())
                if item is None:
                    break
                if samples + item.request.samples > self.max_batch_size:
                    self._carry = item  # never split a request; it leads the next batch
                    break
                batch.append(item)
                samples += item.request.samples
            task = loop.create_task(self._dispatch(batch, None, learn_overhead=len(self._inflight) == 0))
            self._inflight.add(task)
            task.add_done_callback(self._batch_done)

    # --- both -------------------------------------------------------------------------------------------

    async def _dispatch(self, batch: list[_Pending], predicted_ms: float | None, learn_overhead: bool = True) -> None:
        started = time.time()
        try:
            reply = await self._call_with_retry([p.request for p in batch], max(p.deadline for p in batch))
        except Exception as exc:  # the whole batch failed: every robot in it hears why
            if isinstance(exc, (asyncio.TimeoutError, *RETRYABLE)):
                # Out of time, waiting on a slow or restarting replica: the robot's deadline, not a policy fault.
                kind, message = "deadline", (
                    f"deadline exceeded: no replica of {self.tag!r} answered in time ({type(exc).__name__})"
                )
            else:
                kind, message = "policy", f"policy {self.tag!r} failed: {type(exc).__name__}: {str(exc)[:300]}"
            for p in batch:
                if not p.future.done():
                    p.future.set_result(Delivered(InferenceOutcome(None, {}, message, kind), "", 0, 0.0, 0.0))
            return
        finally:
            self._slots.release()
        finished = time.time()
        self._learn(reply, (finished - started) * 1000.0 if learn_overhead else math.nan)
        starts = [t["forward_start"] for t in reply.timings if "forward_start" in t]
        if starts and learn_overhead:  # sent to a replica believed free: did it wait there behind another batch?
            self.counts["waited_at_replica"] += min(starts) - started > STACKED_S
        # Follow the replica's live user_config (max_batch_size, batch_wait_ms) from the next batch on.
        self.max_batch_size, self.batch_wait_ms = reply.max_batch_size, reply.batch_wait_ms
        for p, outcome, timing in zip(batch, reply.outcomes, reply.timings):
            if p.future.done():
                continue
            if outcome.error is None:
                self.counts["on_time"] += finished <= p.deadline
            queue_ms = max(0.0, (timing.get("forward_start", p.received) - p.received) * 1000.0)
            trace = {"queued": p.queued, "sent": started, "back": finished, **reply.trace}
            if "forward_start" in timing:
                trace["forward_start"] = timing["forward_start"]
                trace["forward_end"] = timing["forward_start"] + timing.get("infer_ms", 0.0) / 1000.0
            p.future.set_result(
                Delivered(outcome, reply.replica, int(timing.get("batch_size", 0)), queue_ms,
                          timing.get("infer_ms", 0.0), predicted_ms, trace)
            )

    def _learn(self, reply: BatchReply, call_ms: float) -> None:
        """Feed the forward-time model with each distinct forward pass of the reply, the call overhead and the
        cold-load time."""
        self.pool.seen(reply.replica)
        self.pool.observe_cold_load(reply.cold_load_ms)
        passes = {(t.get("forward_start"), t.get("infer_ms")): t for t in reply.timings if "infer_ms" in t}
        forward_ms = 0.0
        for t in passes.values():
            samples = int(t.get("batch_size", 0))
            if samples > 0:  # a pass of expired requests only says nothing about forward time
                self.model.observe(samples, t["infer_ms"])
            forward_ms += t["infer_ms"]
        if passes and math.isfinite(call_ms):
            extra = max(0.0, call_ms - forward_ms - reply.cold_load_ms)
            # EWMA, robust to a call that stalled (a cold replica, a retry): one sample moves it a little.
            cap = OVERHEAD_FIRST_CAP_MS if self.overhead_ms == 0.0 else 2 * self.overhead_ms + 5.0
            extra = min(extra, cap)
            self.overhead_ms = extra if self.overhead_ms == 0.0 else 0.9 * self.overhead_ms + 0.1 * extra

    async def _call_with_retry(self, requests: list[InferenceRequest], deadline: float) -> BatchReply:
        attempt = 0
        while True:
            try:
                # Bounded by the deadline: a hung replica must not hold an in-flight slot forever.
                call = self._send(requests, self.load()) if self._with_load else self._send(requests)
                return await asyncio.wait_for(call, max(0.0, deadline - time.time()))
            except RETRYABLE:
                attempt += 1
                backoff = min(MAX_BACKOFF_S, 0.05 * 2**attempt)
                if time.time() + backoff >= deadline:
                    raise
                await asyncio.sleep(backoff)  # while Serve routes around the dead replica or restarts it

    async def close(self) -> None:
        self.pool.leave(self)
        if self._task is not None:
            self._task.cancel()
        if self._inflight:  # answer what is already on its way before going (graceful shutdown)
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {"queued": self.queued, "inflight_batches": len(self._inflight), "max_batch_size": self.max_batch_size,
                "batch_wait_ms": self.batch_wait_ms, "scheduler": self.scheduler, "replicas": self.replicas,
                "overhead_ms": round(self.overhead_ms, 3), "forward_model": self.model.snapshot(), **self.counts}
