"""The Serve request router of the policy deployments (serving.routing), without a Serve cluster: replicas and
requests are stand-ins exposing the attributes Serve's RunningReplica / PendingRequest give a router."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from serving.messages import InferenceRequest
from serving.routing import SampleBalancedRouter, batch_samples, predicted_work_ms


def request(samples: int = 1) -> InferenceRequest:
    return InferenceRequest({}, None, samples)


def test_router_weighs_replicas_by_predicted_work():
    class PR:
        def __init__(self, args):
            self.args = args

    assert batch_samples(PR([[request(3), request(2)], {}])) == 5
    assert batch_samples(PR([])) == 1 and batch_samples(None) == 1
    slow, fast = {"per_sample_ms": 100.0, "fixed_ms": 50.0}, {"per_sample_ms": 20.0, "fixed_ms": 50.0}
    assert predicted_work_ms(4, slow) == 450.0 and predicted_work_ms(4, fast) == 130.0
    assert predicted_work_ms(0, slow) == 0.0  # an idle replica has no work, whatever its speed
    assert predicted_work_ms(3, {}) == 3  # no stats yet: samples


def test_router_sends_each_batch_to_the_replica_with_the_least_predicted_work():
    router = object.__new__(SampleBalancedRouter)  # Serve builds it with a live controller; the logic needs none
    router.initialize_state()
    stats = {"per_sample_ms": 100.0, "fixed_ms": 50.0, "inflight_samples": 0.0}
    a = SimpleNamespace(replica_id="a", routing_stats=dict(stats))
    b = SimpleNamespace(replica_id="b", routing_stats=dict(stats, inflight_samples=3.0))  # b reported 3 samples

    def batch(rid: str, samples: int):
        return SimpleNamespace(args=[[request(samples)], {}],
                               metadata=SimpleNamespace(multiplexed_model_id="", internal_request_id=rid))

    async def main():
        ranked = await router.choose_replicas([a, b], batch("r1", 8))
        assert [r[0].replica_id for r in ranked] == ["a", "b"]  # a: no work; b: 3 samples
        # the 8 samples just sent to a count at once (no stats poll yet): the next batch goes to b
        ranked = await router.choose_replicas([a, b], batch("r2", 2))
        assert ranked[0][0].replica_id == "b"
        router.on_request_completed("a", "r1")  # a's batch answered: a is the least loaded again
        ranked = await router.choose_replicas([a, b], batch("r3", 1))
        assert ranked[0][0].replica_id == "a"
        # A replica whose batch is due to end now (its reply not counted back yet) goes before one that
        # started a smaller batch a moment ago: the next batch would wait behind that one.
        router.on_request_completed("a", "r3")
        router.on_request_completed("b", "r2")
        a.routing_stats = b.routing_stats = dict(stats)
        await router.choose_replicas([a, b], batch("r4", 8))
        await router.choose_replicas([a, b], batch("r5", 2))
        first, second = router._routed["r4"][0], router._routed["r5"][0]
        assert first != second  # both idle: r4 to either, r5 to the other
        sent_at = time.monotonic() - 0.84  # r4's pass (50 + 8 x 100 ms) ends in 10 ms; r5's in 240 ms
        router._routed["r4"] = (first, 8, sent_at)
        ranked = await router.choose_replicas([a, b], batch("r6", 1))
        assert ranked[0][0].replica_id == first

    asyncio.run(main())
