"""What the ingress serves: each embodiment's tag, its policy deployment and its models (the default one and its
fine-tunes), and where each model is loaded.

The model set starts from the app's args and then follows the replicas' live user_config (`serve deploy` adds
or removes fine-tunes without a restart): an unknown name asks a replica for its current table, at most once per
`MODELS_REFRESH_S` per embodiment. Replies say which models each replica holds (`ResidentModels`), which is what
`info` lists and what the scheduler needs to know to predict a cold load. Per model it also counts the requests
and the cold loads they waited on, for the status page.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable, Generic, Mapping, TypeVar

from clients.protocol import RequestError, canonical_tag
from serving.config import DEFAULT_MODEL, GRPC_MAX_MESSAGE_ENV, LOW_LATENCY_ENV_VARS
from serving.messages import BatchReply
from serving.residency import ResidentModels

# An unknown model name asks the replicas for their live model set (it may have been added by `serve deploy`
# since) at most this often per embodiment; robots sending made-up names cost one Ray call per interval.
MODELS_REFRESH_S = 1.0

H = TypeVar("H")
T = TypeVar("T")


class Once(Generic[T]):
    """Fetch a value from a replica once, share it with every waiting request, retry after a failure."""

    def __init__(self, fetch: Callable[[], Awaitable[T]]):
        self._fetch = fetch
        self._task: asyncio.Task | None = None

    async def _run(self) -> T:
        return await self._fetch()

    async def get(self) -> T:
        if self._task is None or (self._task.done() and self._task.exception() is not None):
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await asyncio.shield(self._task)


class ModelCounts:
    """One model's requests and the cold loads they waited on (the load time the replicas measured)."""

    __slots__ = ("requests", "cold_requests", "cold_batches", "cold_ms_sum", "cold_ms_last")

    def __init__(self):
        self.requests = self.cold_requests = self.cold_batches = 0
        self.cold_ms_sum = self.cold_ms_last = 0.0

    def add(self, requests: int, cold_load_ms: float) -> None:
        self.requests += requests
        if cold_load_ms:
            self.cold_requests += requests
            self.cold_batches += 1
            self.cold_ms_sum += cold_load_ms
            self.cold_ms_last = cold_load_ms

    def status(self) -> dict[str, float]:
        out: dict[str, float] = {"requests": self.requests, "cold_load_requests": self.cold_requests}
        if self.cold_batches:
            out["cold_load_ms_mean"] = round(self.cold_ms_sum / self.cold_batches, 1)
            out["cold_load_ms_last"] = round(self.cold_ms_last, 1)
        return out


class ModelRegistry(Generic[H]):
    """Embodiment tag -> its deployment handle and models. `H` is a Serve DeploymentHandle in the ingress."""

    def __init__(self, handles: Mapping[str, H], models: Mapping[str, list[str]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not handles:
            raise ValueError("ModelRegistry: expected at least one embodiment, got none")
        self._clock = clock
        self._handles = {canonical_tag(tag): h for tag, h in handles.items()}
        self._model_handles: dict[tuple[str, str], H] = {}
        self._batch_handles: dict[tuple[str, str], H] = {}
        # Batches go by Serve's gRPC transport where the replicas take batch-sized messages (see batch_handle).
        self._grpc = os.environ.get(GRPC_MAX_MESSAGE_ENV) == LOW_LATENCY_ENV_VARS[GRPC_MAX_MESSAGE_ENV]
        self._served: dict[str, set[str]] = {tag: {DEFAULT_MODEL, *(models or {}).get(tag, [])} for tag in self._handles}
        self._checked: dict[str, float] = {}
        self.resident: dict[str, ResidentModels] = {tag: ResidentModels() for tag in self._handles}
        self._counts: dict[tuple[str, str], ModelCounts] = {}
        self._describe = {tag: Once(lambda h=h: h.describe.remote()) for tag, h in self._handles.items()}
        self._modality: dict[tuple[str, str], Once] = {}
        self.on_cold_load: Callable[[str, float], None] = lambda tag, ms: None  # the replicas' measured load time

    # --- embodiments -----------------------------------------------------------------------------------

    @property
    def tags(self) -> list[str]:
        return sorted(self._handles)

    def resolve(self, tag: str) -> str:
        """The canonical served tag for `tag`, or a RequestError listing the served tags."""
        try:
            key = canonical_tag(tag)
        except ValueError:
            raise RequestError(
                f"embodiment_tag: {tag!r:.60} is not served here (not a tag name: letters, digits and _ . + -); "
                f"served: {', '.join(self.tags)}"
            ) from None
        if key not in self._handles:
            raise RequestError(f"embodiment_tag: {tag!r:.60} is not served here; served: {', '.join(self.tags)}")
        return key

    def deployment(self, tag: str) -> H:
        return self._handles[tag]

    def handle(self, tag: str, model: str) -> H:
        """The handle whose calls reach `model` of `tag`: the default model answers calls without a multiplexed
        id; a fine-tune's id routes its calls to the replicas that hold it (Serve's multiplexing)."""
        key = (tag, model)
        handle = self._model_handles.get(key)
        if handle is None:
            base = self._handles[tag]
            handle = base if model == DEFAULT_MODEL else base.options(multiplexed_model_id=model)
            self._model_handles[key] = handle
        return handle

    def batch_handle(self, tag: str, model: str) -> H:
        """The handle a scheduler sends `model`'s batches through. Serve's gRPC transport between deployments
        (`_by_reference=False`) rather than an actor call: a unary call the replica accepts or rejects in place of
        a streaming one whose first message says so, measured 1.2 ms less per batch at one robot (bench.hops;
        BENCHMARKS.md). Pickled both ways (the classes are ours, the peers our replicas), the frames in-band: the
        one copy the call needs. Only where the app's runtime_env raised gRPC's 4 MiB message limit
        (LOW_LATENCY_ENV_VARS), else by actor call as the other endpoints go."""
        key = (tag, model)
        handle = self._batch_handles.get(key)
        if handle is None:
            handle = self.handle(tag, model)
            if self._grpc:
                handle = handle.options(_by_reference=False, request_serialization="pickle",
                                        response_serialization="pickle")
            self._batch_handles[key] = handle
        return handle

    # --- models ----------------------------------------------------------------------------------------

    def served(self, tag: str) -> set[str]:
        return self._served[tag]

    def with_fine_tunes(self) -> list[str]:
        return [tag for tag, served in self._served.items() if len(served) > 1]

    async def choose(self, tag: str, asked: Any, port_model: str | None) -> str:
        """The model a request gets: the one it names (checked against the live set), else its port's, else
        the embodiment's default."""
        if asked is None:
            return port_model or DEFAULT_MODEL
        if not isinstance(asked, str):
            raise RequestError(f"model_id: expected a string (a model name), got {type(asked).__name__}")
        if asked not in self._served[tag] and self._clock() - self._checked.get(tag, -MODELS_REFRESH_S) > MODELS_REFRESH_S:
            await self.table(tag)  # added by `serve deploy` since we last looked?
        if asked not in self._served[tag]:
            raise RequestError(
                f"model_id: {asked!r:.80} is not served for {tag!r}; served: {', '.join(sorted(self._served[tag]))}"
            )
        return asked

    async def table(self, tag: str) -> dict[str, Any]:
        """One replica's live view of `tag`'s models (served set, resident models, cold-load times)."""
        table = await self._handles[tag].models.remote()
        self._served[tag] = set(table["served"])
        self.resident[tag][table["replica"]] = table["resident"]
        self.on_cold_load(tag, max(table.get("cold_load_ms", {}).values(), default=0.0))
        self._checked[tag] = self._clock()
        return table

    def holds(self, tag: str, model: str) -> bool:
        """Whether some replica holds `model` (the default model: always)."""
        return model == DEFAULT_MODEL or bool(self.resident[tag].holding(model))

    def note_reply(self, tag: str, model: str, requests: int, reply: BatchReply) -> None:
        if reply.models_resident:
            self.resident[tag][reply.replica] = reply.models_resident
        counts = self._counts.get((tag, model))
        if counts is None:
            counts = self._counts[(tag, model)] = ModelCounts()
        counts.add(requests, reply.cold_load_ms)

    async def describe(self, tag: str) -> Any:
        return await self._describe[tag].get()

    async def modality_config(self, tag: str, model: str) -> Any:
        once = self._modality.get((tag, model))
        if once is None:
            handle = self.handle(tag, model)
            once = self._modality[(tag, model)] = Once(lambda: handle.modality_config.remote())
        return await once.get()

    def status(self) -> dict[str, Any]:
        return {f"{tag}/{model}": counts.status() for (tag, model), counts in self._counts.items()}
