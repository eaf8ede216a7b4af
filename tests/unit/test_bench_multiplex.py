"""bench.multiplex decides before starting a layout whether it fits this machine's memory (pure arithmetic)."""

from __future__ import annotations

from bench.multiplex import RAY_BASE_MB, build_parser, fit_check, layout_memory_mb, mem_available_mb, print_table

SMALL = {"process_mb": 120.0, "replica_mb": 900.0, "checkpoint_mb": 370.0}


def test_dedicated_small_fine_tunes_do_not_fit_24_gib_and_say_why():
    estimate = layout_memory_mb("dedicated", SMALL, fine_tunes=32, replicas=2, max_models=8)
    assert estimate["policy_replicas"] == 32 and estimate["per_replica_mb"] == 900.0
    assert estimate["total_mb"] == 32 * 900 + 34 * 120 + RAY_BASE_MB  # 32 ingresses, controller and proxy, Ray
    why = fit_check(estimate, available_mb=22_000)
    assert why is not None and why.startswith("does not fit: 32 replicas x 0.9 GB")
    assert "= 32.7 GB > 19.3 GB available" in why, why


def test_the_pool_fits_where_a_replica_per_fine_tune_does_not():
    pooled = layout_memory_mb("pooled", SMALL, fine_tunes=32, replicas=2, max_models=8)
    assert pooled["policy_replicas"] == 2
    assert pooled["per_replica_mb"] == 900 + 8 * 370  # the default model and max_models fine-tunes resident
    assert fit_check(pooled, available_mb=22_000) is None
    # Fewer fine-tunes than slots: only those are ever resident.
    assert layout_memory_mb("pooled", SMALL, fine_tunes=4, replicas=2, max_models=8)["per_replica_mb"] == 900 + 3 * 370


def test_a_ray_worker_overhead_measured_on_a_run_counts_per_process():
    bare = layout_memory_mb("dedicated", SMALL, fine_tunes=4, replicas=2, max_models=2)
    worker = layout_memory_mb("dedicated", SMALL, fine_tunes=4, replicas=2, max_models=2, worker_mb=100.0)
    assert worker["total_mb"] - bare["total_mb"] == (4 + 4 + 2) * 100.0  # replicas, ingresses, controller+proxy


def test_the_free_share_is_kept():
    estimate = {"policy_replicas": 1, "per_replica_mb": 900.0, "total_mb": 950.0}
    assert fit_check(estimate, available_mb=1000.0, free_share=0.0) is None
    reason = fit_check(estimate, available_mb=1000.0, free_share=0.1)  # 950 MB > 90% of 1000 MB
    assert reason.startswith("does not fit: 1 replicas x 0.9 GB") and "(90% of MemAvailable 1.0 GB)" in reason, reason


def test_mem_available_is_read_and_the_start_deadline_has_a_default():
    assert mem_available_mb() > 0
    assert build_parser().parse_args([]).start_timeout_s > 0
    assert build_parser().parse_args(["--start-timeout-s", "30"]).start_timeout_s == 30.0


def test_a_skipped_layout_shows_in_the_table(capsys):
    print_table({"pooled": {"throughput_rps": 12.5, "p50_ms": 80.0, "cold_load_ms_mean": 410.0},
                 "dedicated": {"skipped": "not up after 600 s"}})
    out = capsys.readouterr().out
    assert "dedicated  skipped: not up after 600 s" in out
    assert "12.5" in out and "410.0" in out
