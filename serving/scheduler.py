"""One embodiment's scheduler: its requests in, one Ray call per batch out, every robot an answer by its deadline.

A Ray call per request costs more than a small model's forward pass on a small machine (BENCHMARKS.md: 269 vs
1948 req/s for 32 robots), so the requests of all an embodiment's models wait here and leave in batches.
`EmbodimentScheduler` owns everything that decision needs, and nothing else writes it:

- the queue, across the embodiment's models, ordered by its policy (`serving.queues`: deadline-class EDF or FIFO);
- the forward-time model (`planning.ForwardTimeModel`, fed by every reply's passes) and the call overhead;
- the batches in flight (when each is predicted to end: when each replica frees) and how many replicas run;
- admission (refused early, overloaded), expiry at the deadline, and the outcome of every request, each with its
  `clients.protocol.Refusal` reason;
- the dispatch decision, taken when something changes (a request arrives, a batch returns, a wait ends): a
  lone request on an idle replica leaves in the same call that admitted it, without waking any task or timer.

It waits `batch_wait_ms` only while another batch travels (robots answered together ride together again), never
past a quarter of the earliest slack. The arithmetic is `serving.planning`'s; the order and what follows from it
is the queue policy's; Ray is behind `send`, and time behind `clock` (the loop's timers run on the same clock in
tests: tests/unit/test_scheduler.py drives it on simulated time).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ray.exceptions import ActorUnavailableError, RayActorError

from clients.protocol import ErrorKind, Refusal, RequestError
from serving.messages import BatchReply, ForwardPass, InferenceOutcome, InferenceRequest
from serving.planning import (
    ClassRates,
    DemandMeter,
    ForwardTimeModel,
    batch_cap,
    call_overhead_ms,
    capacity_samples_per_s,
    free_at,
    reach_s,
    replicas_needed,
    service_ms,
    steady_batch_size,
)
from serving.queues import RequestQueue, Waiting, create_request_queue

# A replica that died or restarts mid-call: get_action is idempotent, so the batch is sent again, until the
# requests' deadline: a replica restart (reloading its checkpoint) takes seconds, not milliseconds.
RETRYABLE = (RayActorError, ActorUnavailableError)
MAX_BACKOFF_S = 1.0
STACKED_S = 0.1  # a batch whose forward pass starts this long after it was sent waited behind another
REPLICA_SEEN_S = 10.0
UTILISATION = 0.8  # autoscaling sizes the replicas for the demand at this share of their capacity

# (model, requests, demand report) -> the replica's reply; the call is issued before the awaitable returns.
Send = Callable[[str, list[InferenceRequest], dict[str, float]], Awaitable[BatchReply]]


async def _within(awaitable: Awaitable[Any], seconds: float) -> Any:
    """`await awaitable`, cancelled with a TimeoutError after `seconds`: asyncio.wait_for would wrap it in a
    task of its own (one more loop turn each way on every batch), asyncio.timeout needs Python 3.11."""
    task = asyncio.current_task()
    fired = False

    def fire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(max(0.0, seconds), fire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if fired:
            raise TimeoutError(f"no reply within {seconds:.3f} s") from None
        raise
    finally:
        timer.cancel()


@dataclass(eq=False)
class Batch:
    """A batch on its way to (or on) a replica."""

    model: str
    items: list[Waiting]
    sent: float  # clock
    service_s: float  # predicted time from dispatch to reply (planning.free_at stacks the batches still out)
    predicted_forward_ms: float | None  # reported beside the replica's infer_ms
    learn_overhead: bool  # sent to a replica believed free: its call time beyond the pass is overhead
    back: float = 0.0  # clock, when the reply came
    reply: BatchReply | None = None


@dataclass
class Delivered:
    """An action and the timings the ingress reports in info["server"]."""

    outcome: InferenceOutcome
    replica: str
    batch_size: int
    queue_ms: float
    infer_ms: float
    predicted_ms: float | None
    item: Waiting = field(repr=False)
    position: int = field(default=0, repr=False)  # in its batch

    def trace(self) -> dict[str, float]:
        """The hops of this request (clock seconds): queued, sent, the replica's, its pass, back."""
        batch: Batch = self.item.batch
        out = {"queued": self.item.queued, "sent": batch.sent, "back": batch.back}
        reply = batch.reply
        if reply is not None:
            out.update(reply.trace)
            index = reply.pass_of[self.position] if reply.pass_of else -1
            if index >= 0:
                p = reply.passes[index]
                out["forward_start"], out["forward_end"] = p.start, p.start + p.infer_ms / 1000.0
                out["forward_threads"] = p.threads
        return out


class EmbodimentScheduler:
    def __init__(
        self,
        tag: str,
        send: Send,
        *,
        policy: str = "edf",
        max_batch_size: int = 16,
        batch_wait_ms: float = 2.0,
        max_inflight: int = 4,
        max_queued: int = 512,
        clock: Callable[[], float] = time.time,
        holds_model: Callable[[str], bool] | None = None,
    ):
        self.tag = tag
        self._send = send
        self._clock = clock
        self.queue: RequestQueue = create_request_queue(policy)
        self.max_batch_size = max_batch_size
        self.batch_wait_ms = batch_wait_ms
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self._holds = holds_model or (lambda model: True)  # whether some replica holds a model (no cold load)
        self.forward = ForwardTimeModel()
        self.base_overhead_ms = 0.0  # a batch call's time beyond its forward pass (Ray hops, (de)serialisation)
        self.cold_load_ms = 0.0  # a fine-tune's load on a replica, as the replicas measured it (EWMA)
        self._inflight: dict[Batch, asyncio.Task] = {}
        self._replicas_hint = 1
        self._seen: dict[str, float] = {}  # replica id -> its last reply (clock)
        self.replicas = 1  # to keep busy: Serve's count, or more if more answered lately (_count_replicas)
        self._fleet: dict[str, float] = {}  # what the ingress knows beyond this embodiment (busy_replicas)
        self._rates = ClassRates()
        self._demand = DemandMeter(clock())
        self._seq = itertools.count()
        self._wait: asyncio.TimerHandle | None = None  # the batch wait running now
        self._waited = False  # ... or just ended: the next batch goes
        self._closed = False
        self.counts: dict[str, int] = {"on_time": 0, "expired": 0, "waited_at_replica": 0,
                                       **{r.value: 0 for r in Refusal}}

    # --- what the ingress tells it -------------------------------------------------------------------

    def observe_replicas(self, running: int) -> None:
        """How many replicas serve the embodiment (Serve's status)."""
        self._replicas_hint = max(1, int(running))
        self._count_replicas()
        self._pump()

    def _count_replicas(self) -> None:
        """Once per reply or status poll, not on every decision that reads it."""
        now = self._clock()
        self._seen = {r: t for r, t in self._seen.items() if now - t < REPLICA_SEEN_S}
        self.replicas = max(1, self._replicas_hint, len(self._seen))

    def observe_fleet(self, busy_replicas: float) -> None:
        """Replicas with work to do over every embodiment (the replicas share the node's cores by it)."""
        self._fleet["busy_replicas"] = float(max(1.0, busy_replicas))

    def seed_cold_load(self, ms: float) -> None:
        """Until a fine-tune loads, a cold load is predicted as long as the default model took."""
        if not self.cold_load_ms:
            self.observe_cold_load(ms)

    def observe_cold_load(self, ms: float) -> None:
        if ms > 0:
            self.cold_load_ms = ms if self.cold_load_ms == 0.0 else 0.7 * self.cold_load_ms + 0.3 * ms

    # --- what the queue policy asks (serving.queues.Capacity) ----------------------------------------------

    def overhead_ms(self, model: str) -> float:
        """A batch call's predicted time beyond its forward pass: the Ray hops, and a cold load when no replica
        holds `model` and no batch of it is on its way (measured by the replicas: predictable)."""
        if self.cold_load_ms and not self._holds(model) and not any(b.model == model for b in self._inflight):
            return self.base_overhead_ms + self.cold_load_ms
        return self.base_overhead_ms

    def free_at(self, now: float) -> list[float]:
        return free_at(now, self.replicas, ((b.sent, b.service_s) for b in self._inflight))

    def _reach(self, now: float, overhead_ms: float) -> float | None:
        return reach_s(self.forward, self._rates.tightest(now), overhead_ms)

    def batch_cap(self, start: float, others, overhead_ms: float) -> int:
        return batch_cap(self.forward, start, others, self._reach(start, overhead_ms), overhead_ms, self.max_batch_size)

    def steady_batch_size(self, now: float, overhead_ms: float) -> int:
        return steady_batch_size(self.forward, self.replicas, self._reach(now, overhead_ms), overhead_ms,
                                 self.max_batch_size)

    def expected_tighter_samples(self, budget_s: float, deadline: float, now: float) -> float:
        return self._rates.expected_tighter_samples(budget_s, deadline, now)

    # --- requests ------------------------------------------------------------------------------------------

    def submit(self, request: InferenceRequest, model: str, received: float, deadline: float,
               due: float | None = None) -> asyncio.Future:
        """The future of `request`'s Delivered; raises RequestError at once when overloaded or predicted late.
        The future fails with a RequestError (kind deadline) at the deadline at the latest: a late action
        never reaches the robot. `due` (default: the deadline) orders the queue only: when a robot's buffer runs
        dry, it is served before those with more left, never refused for it."""
        now = self._clock()
        self._demand.add(request.samples, now)
        if len(self.queue) >= self.max_queued:
            self.counts[Refusal.OVERLOADED.value] += 1
            raise RequestError(
                f"overloaded: {len(self.queue)} get_action requests for {self.tag!r} are already waiting "
                f"(max_queued_requests={self.max_queued}); retry later", ErrorKind.OVERLOADED, Refusal.OVERLOADED)
        request.deadline = deadline
        self._rates.add(deadline - received, request.samples, now)
        loop = asyncio.get_running_loop()
        item = Waiting(request, model, received, deadline, next(self._seq), loop.create_future(), now)
        if due is not None:
            item.due = min(due, deadline)
        late = self.queue.refuse_on_arrival(item, self, now)
        if late is not None:
            raise self._refused_early(item, late)
        self.queue.add(item)
        item.timer = loop.call_at(loop.time() + (deadline - now), self._expire, item)
        self._pump()
        return item.future

    def _refused_early(self, item: Waiting, predicted_done: float) -> RequestError:
        self.counts[Refusal.REFUSED_EARLY.value] += 1
        return RequestError(
            f"deadline: refused early, predicted {(predicted_done - item.received) * 1000:.0f} ms to an action "
            f"for {self.tag!r} but the deadline allows {item.budget_s * 1000:.0f} ms "
            f"({len(self.queue)} waiting on {self.replicas} replica(s)); resend a fresh observation",
            ErrorKind.DEADLINE, Refusal.REFUSED_EARLY)

    def _refuse(self, item: Waiting, predicted_done: float) -> None:
        if item.timer is not None:
            item.timer.cancel()
        if not item.future.done():
            item.future.set_exception(self._refused_early(item, predicted_done))

    def _expire(self, item: Waiting) -> None:
        """The deadline passed with no action: the robot hears it now, and nothing computed later reaches it."""
        if item.future.done():
            return
        reason = Refusal.EXPIRED_WAITING if item.batch is None else Refusal.EXPIRED_ON_REPLICA
        self.counts["expired"] += 1
        self.counts[reason.value] += 1
        where = "waiting for a batch" if item.batch is None else "its batch on a replica"
        item.future.set_exception(RequestError(
            f"deadline exceeded: no action for {self.tag!r} within {item.budget_s * 1000:.0f} ms ({where}; "
            f"{len(self.queue)} waiting, {len(self._inflight)} batches in flight)", ErrorKind.DEADLINE, reason))

    # --- dispatch ------------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Send what can go now. Called whenever that may have changed: an arrival, a reply, a wait's end."""
        while not self._closed:
            head = self.queue.head()
            if head is None or len(self._inflight) >= self.queue.slots(self):
                return
            if self._inflight and self.batch_wait_ms > 0 and self.queue.samples < self.max_batch_size and not self._waited:
                # Another batch travels: wait a little for the robots it answered, not past a quarter of any slack.
                if self._wait is None:
                    self.queue.prune()
                    slack = min(i.deadline for i in self.queue) - self._clock()
                    self._wait = asyncio.get_running_loop().call_later(
                        max(0.0, min(self.batch_wait_ms / 1000.0, slack / 4)), self._end_wait)
                return
            self._waited = False
            if self._wait is not None:  # a replica freed before the wait ended: no reason to wait longer
                self._wait.cancel()
                self._wait = None
            if not self._send_next(head.model):
                return

    def _end_wait(self) -> None:
        self._wait, self._waited = None, True
        self._pump()

    def _send_next(self, model: str) -> bool:
        """Plan and send the next batch of `model`; False when nothing changed."""
        now = self._clock()
        overhead = self.overhead_ms(model)
        # The batch starts now on an idle replica, else when the first busy one is predicted to be free.
        start, *others = self.free_at(now)
        plan = self.queue.next_batch(model, self, start, others, overhead)
        self.queue.remove(plan.batch + plan.refuse)
        for item in plan.refuse:
            self._refuse(item, start + (service_ms(self.forward, item.samples, overhead, tail=True) or 0.0) / 1000.0)
        if not plan.batch:
            return bool(plan.refuse)
        samples = sum(i.samples for i in plan.batch)
        batch = Batch(model, plan.batch, now, (plan.predicted_ms or 0.0) / 1000.0, self.forward.predict(samples),
                      learn_overhead=start <= now)
        for item in plan.batch:
            item.batch = batch
        requests = [i.request for i in plan.batch]
        # The call leaves now, before the task that awaits its reply first runs.
        call = self._send(model, requests, self.load())
        self._inflight[batch] = asyncio.get_running_loop().create_task(self._complete(batch, call, requests))
        shed = self.queue.shed(self, now)
        self.queue.remove([item for item, _ in shed])
        for item, done in shed:
            self._refuse(item, done)
        return True

    async def _complete(self, batch: Batch, call: Awaitable[BatchReply], requests: list[InferenceRequest]) -> None:
        try:
            reply = await self._with_retry(batch, call, requests)
        except Exception as exc:  # the whole batch failed: every robot in it hears why
            self._fail(batch, exc)
        else:
            batch.back, batch.reply = self._clock(), reply
            self._learn(batch, reply)
            self._deliver(batch, reply)
        finally:
            self._inflight.pop(batch, None)
            self._pump()  # a replica freed

    async def _with_retry(self, batch: Batch, call: Awaitable[BatchReply], requests: list[InferenceRequest]) -> BatchReply:
        deadline = max(i.deadline for i in batch.items)
        attempt = 0
        while True:
            try:
                # Bounded by the deadline: a hung replica must not hold an in-flight slot forever.
                return await _within(call, deadline - self._clock())
            except RETRYABLE:
                attempt += 1
                backoff = min(MAX_BACKOFF_S, 0.05 * 2**attempt)
                if self._clock() + backoff >= deadline:
                    raise
                await asyncio.sleep(backoff)  # while Serve routes around the dead replica or restarts it
                call = self._send(batch.model, requests, self.load())

    def _fail(self, batch: Batch, exc: BaseException) -> None:
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError, *RETRYABLE)):
            # Out of time, waiting on a slow or restarting replica: the robot's deadline, not a policy fault.
            error = RequestError(f"deadline exceeded: no replica of {self.tag!r} answered in time ({type(exc).__name__})",
                                 ErrorKind.DEADLINE, Refusal.EXPIRED_ON_REPLICA)
        else:
            error = RequestError(f"policy {self.tag!r} failed: {type(exc).__name__}: {str(exc)[:300]}", ErrorKind.POLICY)
        for item in batch.items:
            if not item.future.done():
                item.timer.cancel()
                if error.reason is not None:
                    self.counts["expired"] += 1
                    self.counts[error.reason.value] += 1
                item.future.set_exception(error)

    def _learn(self, batch: Batch, reply: BatchReply) -> None:
        """Feed the forward-time model with each pass of the reply, the call overhead and the cold-load time."""
        if reply.replica not in self._seen:
            self._seen[reply.replica] = batch.back
            self._count_replicas()
        self._seen[reply.replica] = batch.back
        self.observe_cold_load(reply.cold_load_ms)
        for p in reply.passes:
            self.forward.observe(p.samples, p.infer_ms)
        if reply.passes and batch.learn_overhead:
            call_ms = (batch.back - batch.sent) * 1000.0
            forward_ms = sum(p.infer_ms for p in reply.passes)
            self.base_overhead_ms = call_overhead_ms(self.base_overhead_ms, call_ms, forward_ms, reply.cold_load_ms)
            # Sent to a replica believed free: did it wait there behind another batch?
            self.counts["waited_at_replica"] += min(p.start for p in reply.passes) - batch.sent > STACKED_S
        # Follow the replica's live user_config (max_batch_size, batch_wait_ms) from the next batch on.
        self.max_batch_size, self.batch_wait_ms = reply.max_batch_size, reply.batch_wait_ms

    def _deliver(self, batch: Batch, reply: BatchReply) -> None:
        now = batch.back
        passes, pass_of = reply.passes, reply.pass_of
        for n, (item, outcome) in enumerate(zip(batch.items, reply.outcomes)):
            if item.future.done():
                continue
            item.timer.cancel()
            if now > item.deadline:  # the reply came as the deadline passed: still late, never delivered
                self._expire(item)
                continue
            if outcome.reason is not None:  # the replica skipped it: expired before its pass
                self.counts["expired"] += 1
                self.counts[outcome.reason] += 1
            elif outcome.error is None:
                self.counts["on_time"] += 1
            p: ForwardPass | None = passes[pass_of[n]] if pass_of and pass_of[n] >= 0 else None
            start = p.start if p is not None else item.received
            item.future.set_result(Delivered(
                outcome, reply.replica, p.samples if p is not None else 0,
                max(0.0, (start - item.received) * 1000.0), p.infer_ms if p is not None else 0.0,
                batch.predicted_forward_ms, item, n))

    # --- what autoscaling and the status page read -----------------------------------------------------------

    def demand_samples_per_s(self) -> float:
        return self._demand.rate(self._clock())

    def load(self) -> dict[str, float]:
        """The embodiment's demand, all its models (sent with each batch; the replicas hand it to autoscaling)."""
        capacity = capacity_samples_per_s(self.forward, self.max_batch_size, self.base_overhead_ms)
        demand = self.demand_samples_per_s()
        return {
            "demand_samples_per_s": round(demand, 3),
            "capacity_samples_per_s": round(capacity or 0.0, 3),
            "queued_samples": float(self.queue.samples),
            "replicas_needed": round(replicas_needed(demand, capacity, UTILISATION), 3),
            "replicas": float(self.replicas),
            **self._fleet,
        }

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def stats(self) -> dict[str, Any]:
        return {"queued": self.queued, "inflight_batches": self.inflight, "max_batch_size": self.max_batch_size,
                "batch_wait_ms": self.batch_wait_ms, "scheduler": self.queue.policy, "replicas": self.replicas,
                "overhead_ms": round(self.base_overhead_ms, 3), "cold_load_ms": round(self.cold_load_ms, 1),
                "forward_model": self.forward.snapshot(), **self.counts}

    async def close(self) -> None:
        """Stop sending; answer what is already on its way (graceful shutdown)."""
        self._closed = True
        if self._wait is not None:
            self._wait.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

