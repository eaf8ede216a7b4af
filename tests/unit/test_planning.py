"""The scheduler's arithmetic (serving.planning) and the other pure decisions (autoscaling, free cores): numbers
in, numbers out, no clock, no loop, no Ray."""

from __future__ import annotations

import pytest

from serving.planning import (
    ClassRates,
    DemandMeter,
    ForwardTimeModel,
    batch_cap,
    call_overhead_ms,
    capacity_samples_per_s,
    free_at,
    inflight_slots,
    plan_batch,
    predict_completion,
    reach_s,
    replicas_needed,
    steady_batch_size,
)


class Item:
    def __init__(self, deadline: float, samples: int = 1):
        self.deadline, self.samples = deadline, samples


def fitted(fixed: float, per_sample: float, sizes=(1, 2, 4, 8, 16)) -> ForwardTimeModel:
    m = ForwardTimeModel()
    for _ in range(5):
        for n in sizes:
            m.observe(n, fixed + per_sample * n)
    return m


# --- the forward-time model -------------------------------------------------------------------------------


def test_model_recovers_a_linear_latency_curve():
    m = fitted(40.0, 10.0)
    assert m.fixed_ms == pytest.approx(40.0, rel=0.05)
    assert m.per_sample_ms == pytest.approx(10.0, rel=0.05)
    assert m.predict(32) == pytest.approx(360.0, rel=0.05)


def test_model_tail_factor_is_how_much_longer_one_pass_in_ten_runs():
    m = fitted(100.0, 0.0, sizes=(1,))
    assert m.tail_factor == 1.0  # exact so far
    for i in range(40):  # one pass in five runs 40% over; none is an outlier to set aside
        m.observe(1, 140.0 if i % 5 == 0 else 100.0)
    assert 1.25 < m.tail_factor < 1.45
    assert m.predict_tail(1) == pytest.approx(m.predict(1) * m.tail_factor)
    for _ in range(64):  # the shared load went away: the window forgets it
        m.observe(1, 100.0)
    assert m.tail_factor < 1.1


def test_model_knows_nothing_before_data_and_is_exact_where_it_saw_data():
    m = ForwardTimeModel()
    assert m.predict(4) is None
    for _ in range(10):
        m.observe(1, 200.0)
    assert m.predict(1) == pytest.approx(200.0)
    # one batch size seen: the slope is a guess (half the time per sample), not zero and not all of it
    assert 200.0 < m.predict(8) < 8 * 200.0


def test_model_shrugs_off_one_stall_and_follows_a_lasting_change():
    m = fitted(40.0, 10.0)
    m.observe(4, 5000.0)  # a GC pause: clipped to 3x the prediction
    assert m.predict(4) < 2 * 80.0
    for _ in range(60):  # the replica got twice as slow for good
        for n in (1, 8):
            m.observe(n, 2 * (40.0 + 10.0 * n))
    assert m.predict(8) == pytest.approx(240.0, rel=0.1)


def test_model_recovers_at_once_from_a_cold_first_pass():
    m = ForwardTimeModel()
    m.observe(1, 12_000.0)  # a replica's first forward pass: allocations, lazy init, a busy machine
    assert not m.ready  # one observation: nothing is refused on it
    for _ in range(6):
        m.observe(1, 10.0)
    assert m.ready and m.predict(1) == pytest.approx(10.0, rel=0.01)


# --- planning ---------------------------------------------------------------------------------------------


def test_plan_cuts_the_batch_where_the_earliest_deadline_would_be_missed():
    m = fitted(40.0, 10.0)  # a batch of n: 40 + 10 n ms
    now = 1000.0
    # earliest deadline 0.105 s away: 6 samples (100 ms) meet it, 7 (110 ms) would not
    queue = [Item(now + 0.105)] + [Item(now + 5.0) for _ in range(9)]
    plan = plan_batch(queue, now, m, overhead_ms=0.0, max_batch_size=16)
    assert len(plan.batch) == 6 and not plan.refuse
    assert plan.predicted_ms == pytest.approx(100.0, rel=0.05)
    # with a full batch waiting (load), a head that would cut the batch below half its size waits instead
    queue = [Item(now + 0.105)] + [Item(now + 5.0) for _ in range(20)]
    plan = plan_batch(queue, now, m, overhead_ms=0.0, max_batch_size=16)
    assert queue[0] not in plan.batch and len(plan.batch) == 16
    # all with slack: the batch fills up to max_batch_size
    plan = plan_batch([Item(now + 5.0) for _ in range(20)], now, m, 0.0, 16)
    assert sum(i.samples for i in plan.batch) == 16


def test_plan_refuses_what_cannot_make_it_even_alone_and_never_splits_a_request():
    m = fitted(40.0, 10.0)
    now = 1000.0
    hopeless = Item(now + 0.030)  # alone: 50 ms
    queue = [hopeless, Item(now + 1.0, samples=10), Item(now + 1.0, samples=10)]
    plan = plan_batch(queue, now, m, 0.0, 16)
    assert plan.refuse == [hopeless]
    assert [i.samples for i in plan.batch] == [10]  # the second 10 does not fit in 16: next batch


def test_a_batch_is_cut_at_the_earliest_deadline_inside_it_not_its_first():
    m = fitted(100.0, 100.0)  # n samples: 100 + 100 n ms
    now = 1000.0
    # queue order puts a request with a later deadline first (the tighter class); the third is due in 0.45 s
    queue = [Item(now + 2.0), Item(now + 2.0), Item(now + 0.45), Item(now + 2.0), Item(now + 2.0)]
    plan = plan_batch(queue, now, m, 0.0, 16)
    # three samples take 400 ms: the batch ends by the third's deadline; a fourth would not
    assert len(plan.batch) == 3 and queue[2] in plan.batch


def test_completion_prediction_counts_the_work_ahead_and_the_free_replicas():
    m = fitted(40.0, 10.0)
    now = 1000.0
    alone = predict_completion(0, 1, [now], now, m, 0.0, 8)
    assert alone == pytest.approx(now + 0.050, abs=0.003)
    # 16 samples ahead on one replica: two full batches (120 ms each) first
    behind = predict_completion(16, 1, [now], now, m, 0.0, 8)
    assert behind == pytest.approx(now + 0.240 + 0.050, abs=0.005)
    # the same work on two replicas: one full batch each, then ours
    assert predict_completion(16, 1, [now, now], now, m, 0.0, 8) == pytest.approx(now + 0.170, abs=0.005)


# --- replicas, slots, the tight class's reach ----------------------------------------------------------------


def test_replicas_free_in_dispatch_order_on_the_first_to_free():
    assert free_at(10.0, 2, []) == [10.0, 10.0]
    # three batches sent at 10.0 in that order, two replicas: the third runs after the first to end
    assert free_at(10.0, 2, [(10.0, 0.5), (10.0, 0.2)]) == pytest.approx([10.2, 10.5])
    assert free_at(10.0, 2, [(10.0, 0.5), (10.0, 0.2), (10.0, 0.4)]) == pytest.approx([10.5, 10.6])
    assert free_at(10.0, 1, [(8.0, 1.0)]) == [10.0]  # predicted past its end: free now


def test_a_batch_sent_behind_one_that_came_back_early_counts_from_its_own_dispatch():
    """One replica: A predicted 6 s (a stall), B sent behind it. A comes back at once: B's replica frees when B
    does, from its own dispatch, not 6 s later; and the batches after it do not pile on a stale end."""
    assert free_at(0.1, 1, [(0.0, 6.0), (0.1, 0.1)]) == pytest.approx([6.1])  # both out: B behind A
    assert free_at(0.15, 1, [(0.1, 0.1)]) == pytest.approx([0.2])  # A back: B alone, from its own dispatch


def test_a_second_batch_waits_at_each_replica_only_when_the_round_trip_is_a_noticeable_share_of_a_pass():
    slow = fitted(200.0, 50.0)  # a full batch of 16: 1000 ms; a 3 ms round trip is nothing to hide
    fast = fitted(2.0, 0.2)  # a full batch: 5.2 ms; a 3 ms round trip is more than half of it
    assert inflight_slots(slow, 16, 3.0, replicas=2, max_inflight=8) == 2
    assert inflight_slots(fast, 16, 3.0, replicas=2, max_inflight=8) == 4
    assert inflight_slots(fast, 16, 3.0, replicas=2, max_inflight=3) == 3  # never past max_inflight
    assert inflight_slots(ForwardTimeModel(), 16, 3.0, replicas=2, max_inflight=5) == 5  # no model yet


def test_batches_stay_short_enough_for_the_tight_class_and_full_without_it():
    m = fitted(100.0, 50.0)
    now = 1000.0
    rates = ClassRates(window_s=5.0)
    for i in range(20):  # 4 s of loose robots at 5 samples/s
        rates.add(4.0, 1, now - 4.0 + i * 0.2)
    assert rates.tightest(now) is None
    assert batch_cap(m, now, [now], reach_s(m, rates.tightest(now), 0.0), 0.0, 16) == 16
    for i in range(8):  # and tight ones (1 s budget): 8 samples in the 5 s window, 1.6 samples/s
        rates.add(1.0, 1, now - 4.0 + i * 0.5)
    reach = reach_s(m, rates.tightest(now), 0.0)
    # reach: (0.9 s - 150 ms alone) / (1 + 0.05 s x 1.6/s) = 0.694 s; an idle other replica: this batch ends
    # within it (11 samples = 650 ms); a replica busy for 0.5 s more: within 0.5 + 0.694 s (21 > 16)
    assert reach == pytest.approx(0.75 / 1.08, abs=0.003)  # the fitted slope is 50 ms to within a ridge
    assert batch_cap(m, now, [now], reach, 0.0, 16) == 11
    assert batch_cap(m, now, [now + 0.5], reach, 0.0, 16) == 16
    assert steady_batch_size(m, 2, reach, 0.0, 16) == 16  # two replicas x 0.694 s: 25 samples, capped at 16


def test_class_rates_name_a_tightest_class_only_when_deadlines_differ():
    rates = ClassRates(window_s=5.0)
    now = 1000.0
    for i in range(20):
        rates.add(4.0, 1, now - 4.0 + i * 0.2)
    assert rates.tightest(now) is None  # one class: nothing to trade against
    for i in range(10):
        rates.add(1.5, 1, now - 4.0 + i * 0.4)
    budget, rate = rates.tightest(now)
    assert budget == 1.5 and rate == pytest.approx(2.0)
    rates.add(3.5, 1, now)  # 4.0 and 3.5 and 1.5: still 1.5
    assert rates.tightest(now)[0] == 1.5


def test_admission_expects_tighter_arrivals_to_pass_a_loose_request():
    rates = ClassRates()
    now = 1000.0
    for i in range(50):  # 5 s of tight robots: 10 samples/s with a 0.25 s budget
        rates.add(0.25, 1, now - 5.0 + i * 0.1)
    rates.add(3.0, 1, now)  # and a loose one
    # a loose request due in 3 s: tight ones arriving in the next 2.75 s would pass it (EDF): ~27 samples
    assert rates.expected_tighter_samples(3.0, now + 3.0, now) == pytest.approx(27.5, rel=0.1)
    assert rates.expected_tighter_samples(0.25, now + 0.25, now) == 0.0  # nothing is tighter than the tightest
    assert rates.expected_tighter_samples(3.0, now + 3.0, now + 6.0) == 0.0  # the tight robots went quiet


# --- demand, capacity, autoscaling ---------------------------------------------------------------------------


def test_demand_is_the_arrival_rate_over_two_windows_and_zero_after_silence():
    meter = DemandMeter(now=0.0)
    for i in range(41):  # 20 samples/s for 2 s; the last one closes the window
        meter.add(1, i * 0.05)
    assert meter.rate(2.0) == pytest.approx(20.0, rel=0.05)
    assert meter.rate(3.0) == pytest.approx(20.0, rel=0.05)  # the last full window still speaks
    assert meter.rate(10.0) < 1.0  # nothing for two windows: no demand


def test_call_overhead_is_an_ewma_robust_to_a_stalled_call():
    first = call_overhead_ms(0.0, call_ms=13.0, forward_ms=10.0, cold_load_ms=0.0)
    assert first == pytest.approx(3.0)
    assert call_overhead_ms(0.0, 5_000.0, 10.0, 0.0) == 50.0  # a cold first call: capped
    stalled = call_overhead_ms(3.0, call_ms=1_010.0, forward_ms=10.0, cold_load_ms=0.0)
    assert stalled == pytest.approx(0.9 * 3.0 + 0.1 * 11.0)  # one stall moves it a little
    assert call_overhead_ms(3.0, 413.0, 10.0, cold_load_ms=400.0) == pytest.approx(3.0)  # a cold load is not overhead


def test_capacity_and_the_replicas_a_demand_needs():
    m = fitted(20.0, 5.0)
    assert capacity_samples_per_s(m, 8, 0.0) == pytest.approx(8 / 0.060, rel=0.05)  # full batch: 20 + 5 x 8 ms
    assert capacity_samples_per_s(ForwardTimeModel(), 8, 0.0) is None
    assert replicas_needed(0.0, 100.0, 0.8) == 0.0
    assert replicas_needed(160.0, 100.0, 0.8) == pytest.approx(2.0)
    assert replicas_needed(5.0, None, 0.8) == 1.0  # demand, speed unknown: one


def test_autoscaling_wants_the_replicas_the_demand_needs():
    from serving.autoscaling import desired_replicas

    assert desired_replicas([1.25, 0.9], current=1, queued_samples=10) == 2  # the largest report, rounded up
    assert desired_replicas([0.3], current=2, queued_samples=0) == 1
    assert desired_replicas([0.0], current=2, queued_samples=0) == 0  # idle: Serve clamps to min_replicas
    assert desired_replicas([], current=2, queued_samples=0) == 2  # no report: keep what runs


def test_free_cores_stay_within_the_share_and_at_least_one():
    from serving.cores import FreeCores

    cores = FreeCores(4, period_s=0.0)
    for share in (1, 2, 4):
        threads = cores.threads(share)
        assert threads is None or 1 <= threads <= share
    usable = cores.measure()
    assert usable is None or 0.0 <= usable <= 4.5  # idle + own, in cores (jiffy rounding aside)


def test_threads_are_the_width_that_measured_faster_at_that_batch_size_re_measured_now_and_then():
    from serving.cores import ThreadChoice

    choice = ThreadChoice(explore_every=8)
    speed = {(1, 1): 4.0, (1, 2): 40.0, (8, 1): 15.0, (8, 2): 10.0}  # ms per pass: (batch, threads)

    def run(samples: int, most: int) -> int:
        threads = choice.choose(samples, most)
        choice.observe(samples, threads, speed[(samples, threads)])
        return threads

    first = [run(1, 2) for _ in range(16)]
    assert first[:2] == [1, 2]  # each width measured once
    assert first[2:].count(1) == 12 and first[7] == first[15] == 2  # then one thread; two re-measured 1 pass in 8
    assert [run(8, 2) for _ in range(4)][2:] == [2, 2]  # a batch of 8: two threads measured faster
    assert {run(8, 1) for _ in range(10)} == {1}  # no second core free: one thread, no experiment
    speed[(8, 2)] = 60.0  # another process took the second core: the next re-measurement moves it back
    assert [run(8, 2) for _ in range(24)][-4:] == [1, 1, 1, 1]
