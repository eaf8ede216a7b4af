"""Micro-batching in the ingress: concurrent robots of one embodiment share ONE Ray call.

A Ray call per request costs more than a small model's forward pass on a small machine (BENCHMARKS.md: 269 vs
1948 req/s for 32 robots), so requests queue here per embodiment and leave in batches: as many samples as
are waiting, up to `max_batch_size`, after at most `batch_wait_ms` (no wait at all when nothing of this
embodiment is in flight: an idle replica should start at once). At most `max_inflight` batches travel at
once; while they do, new requests pile up and form the next, larger batch. That is the dynamic batching.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ray.exceptions import ActorUnavailableError, RayActorError

from serving.messages import BatchReply, InferenceOutcome, InferenceRequest
from serving.protocol import RequestError

# A replica that died or restarts mid-call: get_action is idempotent, so the batch is sent again, until the
# requests' deadline: a replica restart (reloading its checkpoint) takes seconds, not milliseconds.
RETRYABLE = (RayActorError, ActorUnavailableError)
MAX_BACKOFF_S = 1.0


@dataclass
class _Pending:
    request: InferenceRequest
    received: float  # time.time() at the ingress
    deadline: float  # time.time() past which the robot gets "deadline exceeded" instead of an action
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def abandoned(self) -> bool:
        """Answered already (its deadline passed while it waited): not worth a place in a batch."""
        return self.future.done()


@dataclass
class Delivered:
    """An outcome with the timings the ingress reports in info["server"]."""

    outcome: InferenceOutcome
    replica: str
    batch_size: int
    queue_ms: float
    infer_ms: float


class EmbodimentBatcher:
    def __init__(
        self,
        tag: str,
        send: Callable[[list[InferenceRequest]], Awaitable[BatchReply]],
        *,
        max_batch_size: int = 16,
        batch_wait_ms: float = 2.0,
        max_inflight: int = 4,
        max_queued: int = 512,
    ):
        self.tag = tag
        self._send = send
        self.max_batch_size = max_batch_size
        self.batch_wait_ms = batch_wait_ms
        self.max_queued = max_queued
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_inflight)
        self._carry: _Pending | None = None  # the request that did not fit in the last batch
        self._inflight: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.tag}")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    async def submit(self, request: InferenceRequest, received: float, deadline: float) -> Delivered:
        """The outcome of `request`, or a RequestError: overloaded (at once) or deadline exceeded (at the deadline)."""
        if self.queued >= self.max_queued:
            raise RequestError(
                f"overloaded: {self.queued} get_action requests for {self.tag!r} are already waiting "
                f"(max_queued_requests={self.max_queued}); retry later",
                "overloaded",
            )
        request.deadline = deadline
        pending = _Pending(request, received, deadline)
        self._queue.put_nowait(pending)
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            pending.future.cancel()  # a late action must never reach the robot; the batcher skips it
            raise RequestError(
                f"deadline exceeded: no action for {self.tag!r} within {(deadline - received) * 1000:.0f} ms "
                f"({self.queued} waiting, {len(self._inflight)} batches in flight)",
                "deadline",
            ) from None

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

    async def _run(self) -> None:
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
            task = loop.create_task(self._dispatch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _dispatch(self, batch: list[_Pending]) -> None:
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
        # Follow the replica's live user_config (max_batch_size, batch_wait_ms) from the next batch on.
        self.max_batch_size, self.batch_wait_ms = reply.max_batch_size, reply.batch_wait_ms
        for p, outcome, timing in zip(batch, reply.outcomes, reply.timings):
            if p.future.done():
                continue
            queue_ms = max(0.0, (timing.get("forward_start", p.received) - p.received) * 1000.0)
            p.future.set_result(
                Delivered(outcome, reply.replica, int(timing.get("batch_size", 0)), queue_ms, timing.get("infer_ms", 0.0))
            )

    async def _call_with_retry(self, requests: list[InferenceRequest], deadline: float) -> BatchReply:
        attempt = 0
        while True:
            try:
                # Bounded by the deadline: a hung replica must not hold an in-flight slot forever.
                return await asyncio.wait_for(self._send(requests), max(0.0, deadline - time.time()))
            except RETRYABLE:
                attempt += 1
                backoff = min(MAX_BACKOFF_S, 0.05 * 2**attempt)
                if time.time() + backoff >= deadline:
                    raise
                await asyncio.sleep(backoff)  # while Serve routes around the dead replica or restarts it

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._inflight:  # answer what is already on its way before going (graceful shutdown)
            await asyncio.gather(*self._inflight, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {"queued": self.queued, "inflight_batches": len(self._inflight), "max_batch_size": self.max_batch_size,
                "batch_wait_ms": self.batch_wait_ms}
