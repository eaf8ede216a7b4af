"""A policy replica's forward passes: one at a time, in a worker thread of their own; calls that arrive while one
runs go together in the next.

A call to an idle replica starts its pass at once, from the call itself: no queue task to wake, no batch timer
(what `@serve.batch` costs a lone robot). Calls that arrive during a pass (from several ingresses, or from one
that sent a batch ahead) wait, and the next pass takes them all: one pass per model (never a mixed one), cut
into passes of at most `max_batch_size` samples (a request is never split). The event loop stays free
meanwhile for new calls and health checks. Ray-free: tests/unit/test_passes.py drives it with a fake forward.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from serving.messages import ForwardPass, InferenceOutcome, InferenceRequest

# (policy, requests) -> an outcome per request and the pass that computed them; runs in the worker thread.
Forward = Callable[[Any, list[InferenceRequest]], tuple[list[InferenceOutcome], ForwardPass]]


@dataclass
class CallResult:
    """One call's share of the passes it rode: an outcome per request, the passes, each outcome's pass, and when
    its first pass was started (epoch s: the end of its wait in the queue)."""

    outcomes: list[InferenceOutcome] = field(default_factory=list)
    passes: list[ForwardPass] = field(default_factory=list)
    pass_of: list[int] = field(default_factory=list)
    taken: float = 0.0


@dataclass
class _Call:
    policy: Any
    requests: list[InferenceRequest]
    future: asyncio.Future


def chunks(items: list[tuple[int, InferenceRequest]], max_samples: int) -> list[list[tuple[int, InferenceRequest]]]:
    """Consecutive runs of at most `max_samples` samples; one request is never split."""
    out: list[list[tuple[int, InferenceRequest]]] = []
    run: list[tuple[int, InferenceRequest]] = []
    size = 0
    for item in items:
        if run and size + item[1].samples > max_samples:
            out.append(run)
            run, size = [], 0
        run.append(item)
        size += item[1].samples
    if run:
        out.append(run)
    return out


class PassQueue:
    def __init__(self, forward: Forward, max_batch_size: int = 16):
        self._forward = forward
        self.max_batch_size = max_batch_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._waiting: list[_Call] = []
        self._running = False

    async def run(self, policy: Any, requests: list[InferenceRequest]) -> CallResult:
        """The outcomes of `requests` on `policy`, from the next pass (this one, when none runs)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Call(policy, requests, future))
        if not self._running:
            self._start()
        return await future

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _start(self) -> None:
        calls, self._waiting = self._waiting, []
        self._running = True
        taken = time.time()
        # A Future, not a task: the callers' cancellation (a robot's deadline) never stops a pass others ride.
        done = asyncio.get_running_loop().run_in_executor(self._executor, self._run, calls, self.max_batch_size)
        done.add_done_callback(lambda f: self._finished(calls, f, taken))

    def _finished(self, calls: list[_Call], done: asyncio.Future, taken: float) -> None:
        self._running = False
        error = done.exception()
        for i, call in enumerate(calls):
            if call.future.done():
                continue
            if error is not None:
                call.future.set_exception(error)
            else:
                result = done.result()[i]
                result.taken = taken
                call.future.set_result(result)
        if self._waiting:
            self._start()

    def _run(self, calls: list[_Call], max_samples: int) -> list[CallResult]:
        """In the worker thread: one pass per model and chunk; each call gets its share."""
        results = [CallResult() for _ in calls]
        by_policy: dict[int, list[int]] = {}
        for i, call in enumerate(calls):
            by_policy.setdefault(id(call.policy), []).append(i)
        for indices in by_policy.values():
            policy = calls[indices[0]].policy
            flat = [(i, r) for i in indices for r in calls[i].requests]
            for chunk in chunks(flat, max_samples):
                outcomes, done = self._forward(policy, [r for _, r in chunk])
                for (i, _), outcome in zip(chunk, outcomes):
                    share = results[i]
                    if not share.passes or share.passes[-1] is not done:
                        share.passes.append(done)
                    share.outcomes.append(outcome)
                    share.pass_of.append(len(share.passes) - 1)
        return results

    def close(self) -> None:
        self._executor.shutdown(wait=False)
