"""The requests waiting for one embodiment's replicas, and the queue policy that orders them.

One queue per embodiment holds the requests of all its models (a replica takes the embodiment's first request
in queue order, whatever its model; a batch never mixes models). A policy is a class behind one interface,
`RequestQueue`, chosen once from `ingress.scheduler` by `create_request_queue` (as vLLM's scheduler picks its
request queue): the order, and what follows from it, which requests to refuse at once and which batch to send
next, live with the policy, so the scheduler never asks which policy it runs.

- `DeadlineClassQueue` (`edf`, the default): the tighter deadline class first, then the earliest deadline
  (`planning.budget_class`). A request predicted to miss its deadline, behind the queue ahead of it and the
  tighter requests expected to pass it, is refused at once; a batch is the longest run that still meets the
  earliest deadline in it (`planning.plan_batch`), kept short enough for the tight class (`planning.batch_cap`);
  one batch per replica in flight, two where the round trip is a noticeable share of a pass.
- `FifoQueue` (`fifo`, the previous scheduler, kept for comparison): oldest first, as many samples as wait up
  to max_batch_size, up to `max_inflight_batches` batches in flight; a request waits out its deadline before
  it hears it was too late.
"""

from __future__ import annotations

import asyncio
import bisect
from abc import ABC, abstractmethod
from operator import attrgetter
from typing import Any, ClassVar, Iterator, Protocol, Sequence

from serving.messages import InferenceRequest
from serving.planning import (
    ForwardTimeModel,
    Plan,
    budget_class,
    inflight_slots,
    plan_batch,
    predict_completion,
    predicted_late,
    service_ms,
)


class Waiting:
    """One get_action waiting for its action: the request, which model it asks for, its times (the scheduler's
    clock, seconds) and the future its robot's handler awaits."""

    __slots__ = ("request", "model", "received", "deadline", "due", "seq", "future", "key", "queued", "timer", "batch")

    def __init__(self, request: InferenceRequest, model: str, received: float, deadline: float, seq: int,
                 future: asyncio.Future, queued: float):
        self.request, self.model, self.received, self.deadline, self.seq = request, model, received, deadline, seq
        # When it should be served: the deadline, or earlier where the robot's action buffer runs dry first. Only
        # the queue's order reads it; refusals and expiry go by the deadline (a robot whose buffer ran dry still
        # wants its action: it stands still until it comes).
        self.due = deadline
        self.future, self.queued = future, queued
        self.key: tuple = ()  # the queue's order (RequestQueue.order)
        self.timer: asyncio.TimerHandle | None = None  # its expiry at the deadline
        self.batch: Any = None  # the batch it rides, once sent (serving.scheduler.Batch)

    @property
    def samples(self) -> int:
        return self.request.samples

    @property
    def budget_s(self) -> float:
        return self.deadline - self.received

    @property
    def abandoned(self) -> bool:
        """Answered already (expired, or its robot's handler went away): not worth a place in a batch."""
        return self.future.done()


class Capacity(Protocol):
    """What a queue policy asks about the embodiment's replicas (serving.scheduler.EmbodimentScheduler)."""

    forward: ForwardTimeModel
    max_batch_size: int
    max_inflight: int
    base_overhead_ms: float
    replicas: int

    def overhead_ms(self, model: str) -> float: ...

    def free_at(self, now: float) -> list[float]: ...

    def batch_cap(self, start: float, others: Sequence[float], overhead_ms: float) -> int: ...

    def steady_batch_size(self, now: float, overhead_ms: float) -> int: ...

    def expected_tighter_samples(self, budget_s: float, deadline: float, now: float) -> float: ...


_KEY = attrgetter("key")


class RequestQueue(ABC):
    """The waiting requests of one embodiment in the order replicas take them, and the decisions that order
    implies. Subclasses give the order and the decisions; the bookkeeping is shared."""

    policy: ClassVar[str]

    def __init__(self) -> None:
        self._items: list[Waiting] = []
        self._samples = 0  # of the items held (abandoned ones included until pruned)

    # --- the order ------------------------------------------------------------------------------------

    @abstractmethod
    def order(self, item: Waiting) -> tuple:
        """The sort key of `item` (the lowest goes first), computed once when it arrives."""

    def add(self, item: Waiting) -> None:
        item.key = self.order(item)
        bisect.insort(self._items, item, key=_KEY)
        self._samples += item.samples

    def remove(self, items: Sequence[Waiting]) -> None:
        gone = {id(i) for i in items}
        self._items = [i for i in self._items if id(i) not in gone]
        self._samples -= sum(i.samples for i in items)

    def prune(self) -> None:
        """Drop the abandoned requests (once per batch, not per request)."""
        if any(i.abandoned for i in self._items):
            self._items = [i for i in self._items if not i.abandoned]
            self._samples = sum(i.samples for i in self._items)

    def head(self) -> Waiting | None:
        while self._items and self._items[0].abandoned:
            self._samples -= self._items.pop(0).samples
        return self._items[0] if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Waiting]:
        return iter(self._items)

    @property
    def samples(self) -> int:
        return self._samples

    def samples_ahead(self, key: tuple) -> int:
        """Live samples waiting before a request of order `key`."""
        ahead = 0
        for i in self._items:
            if i.key >= key:
                break
            if not i.abandoned:
                ahead += i.samples
        return ahead

    def of_model(self, model: str) -> list[Waiting]:
        """The live requests for `model`, in queue order (a batch never mixes models)."""
        return [i for i in self._items if i.model == model and not i.abandoned]

    # --- the decisions ---------------------------------------------------------------------------------

    @abstractmethod
    def refuse_on_arrival(self, item: Waiting, cap: Capacity, now: float) -> float | None:
        """The predicted completion of a request about to join, when it is past its deadline (refuse it at
        once), else None."""

    @abstractmethod
    def next_batch(self, model: str, cap: Capacity, start: float, others: Sequence[float], overhead_ms: float) -> Plan:
        """The next batch for `model` (the head's), starting at `start` on the first replica to free (the others
        free at `others`), and the requests to refuse now."""

    @abstractmethod
    def shed(self, cap: Capacity, now: float) -> list[tuple[Waiting, float]]:
        """(request, predicted completion) of the waiting requests the queue ahead of them makes late."""

    @abstractmethod
    def slots(self, cap: Capacity) -> int:
        """Batches that may be in flight at once."""


class DeadlineClassQueue(RequestQueue):
    """`edf`: the tighter deadline class first, the earliest deadline within a class, arrival order on ties."""

    policy = "edf"

    def order(self, item: Waiting) -> tuple:
        return budget_class(item.due - item.received), item.due, item.seq

    def refuse_on_arrival(self, item: Waiting, cap: Capacity, now: float) -> float | None:
        if not cap.forward.ready:
            return None
        # Ahead of it: every request before it in queue order, whatever its model, and the tighter ones
        # expected to arrive and pass it before its deadline.
        ahead = self.samples_ahead(self.order(item))
        ahead += round(cap.expected_tighter_samples(item.budget_s, item.deadline, now))
        overhead = cap.overhead_ms(item.model)
        done = predict_completion(ahead, item.samples, cap.free_at(now), now, cap.forward, overhead,
                                  cap.steady_batch_size(now, overhead))
        return done if done is not None and done > item.deadline else None

    def next_batch(self, model: str, cap: Capacity, start: float, others: Sequence[float], overhead_ms: float) -> Plan:
        return plan_batch(self.of_model(model), start, cap.forward, overhead_ms,
                          cap.batch_cap(start, others, overhead_ms), others)

    def shed(self, cap: Capacity, now: float) -> list[tuple[Waiting, float]]:
        self.prune()
        overhead = cap.base_overhead_ms
        return predicted_late(self._items, cap.free_at(now), cap.forward, overhead,
                              cap.steady_batch_size(now, overhead))

    def slots(self, cap: Capacity) -> int:
        return inflight_slots(cap.forward, cap.max_batch_size, cap.base_overhead_ms, cap.replicas, cap.max_inflight)


class FifoQueue(RequestQueue):
    """`fifo`: arrival order; nothing refused early."""

    policy = "fifo"

    def order(self, item: Waiting) -> tuple:
        return (item.seq,)

    def refuse_on_arrival(self, item: Waiting, cap: Capacity, now: float) -> float | None:
        return None

    def next_batch(self, model: str, cap: Capacity, start: float, others: Sequence[float], overhead_ms: float) -> Plan:
        batch, samples = [], 0
        for item in self.of_model(model):
            if batch and samples + item.samples > cap.max_batch_size:
                break  # never split a request; it leads the next batch
            batch.append(item)
            samples += item.samples
        return Plan(batch, [], service_ms(cap.forward, samples, overhead_ms))

    def shed(self, cap: Capacity, now: float) -> list[tuple[Waiting, float]]:
        return []

    def slots(self, cap: Capacity) -> int:
        return cap.max_inflight


QUEUE_POLICIES: dict[str, type[RequestQueue]] = {q.policy: q for q in (DeadlineClassQueue, FifoQueue)}


def create_request_queue(policy: str) -> RequestQueue:
    """The queue of `ingress.scheduler` (edf or fifo)."""
    try:
        return QUEUE_POLICIES[policy]()
    except KeyError:
        raise ValueError(f"scheduler: expected one of {', '.join(repr(p) for p in QUEUE_POLICIES)}, got {policy!r}") from None
