"""Every benchmark runs end to end, as a user runs it (``python -m bench.X``), on the smallest
settings. Nothing here is timed: a benchmark that no longer runs (an API it uses changed, a
one-round edge case) fails here instead of on the day someone needs the figures. The checks are
on what a run must produce whatever the machine: payload sizes, call counts, batch composition,
bit-identical results, the table's rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def run_bench(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def test_reward_server_benchmarks_run(tmp_path):
    out = tmp_path / "reward_server.json"
    proc = run_bench("bench.run_all", "--quick", "--out", str(out))
    r = json.loads(out.read_text())
    assert r["quick"] is True and "transport_malloc_diagnostic" not in r

    t = r["transport"]
    assert t["bytes_per_group"]["ours_raw_rgb8"] == 16 * 512 * 512 * 3
    assert 0 < t["bytes_per_group"]["baseline_pickled_jpeg_q75"] < 2 << 20  # JPEG q75 of photo-like images
    assert t["ours_unary"]["score_calls_per_group"] == 3  # the client's defaults split 12.6 MB in three
    for path in ("ours_unary", "ours_unary_single_call", "ours_unary_shared_memory", "baseline_pickle_http_jpeg"):
        assert t[path]["n"] == 2 and t[path]["median_ms"] > 0, path
    for path in ("ours_stream", "ours_stream_shared_memory"):
        assert t[path]["n"] == 1 and t[path]["median_ms"] > 0, path
    assert {k: v["rounds"] for k, v in t["paired_speedup"].items()} == {
        "unary": 2, "unary_single_call": 2, "unary_shared_memory": 2, "stream": 1, "stream_shared_memory": 1,
    }  # fmt: skip

    b = r["batching"]
    off, on = b["batching_off"], b["batching_on"]
    assert off["images"] > 0 and on["images"] > 0
    # batching off: every model call is one request's 4 images; on: 8 concurrent clients merge
    assert off["mean_requests_per_call"] == 1.0 and off["mean_batch_images"] == 4.0
    assert on["mean_requests_per_call"] > 1.0 and on["mean_batch_images"] <= on["batching"]["max_batch_size"]
    assert b["memory"]["scored_images"] > 0 and b["memory"]["peak_rss_mib"] >= b["memory"]["rss_after_start_mib"] > 0

    assert set(r["targets_met"]) == {
        "transport_speedup_3x_unary", "transport_speedup_3x_stream", "transport_speedup_3x_unary_shared_memory",
        "batching_speedup_1.5x", "tiny_preset_peak_rss_below_1.5GiB",
    }  # fmt: skip
    table = proc.stdout
    assert table.startswith("SMOKE RUN (--quick)")
    for row in (
        "Transport speedup, unary (baseline",
        "Transport speedup, stream (",
        "Batching speedup",
        "Peak RSS, `--preset tiny`",
    ):
        assert f"| {row}" in table, row


def test_feature_cache_benchmark_runs_and_the_cache_changes_nothing(tmp_path):
    out = tmp_path / "feature_cache.json"
    run_bench("bench.feature_cache", "--quick", "--out", str(out))  # exits 1 unless bit-identical
    r = json.loads(out.read_text())
    for case in ("tiny", "vitb_112"):
        assert r[case]["bit_identical"] is True, case


def test_trainer_overlap_benchmark_runs_with_one_epoch(tmp_path):
    out = tmp_path / "trainer.json"
    proc = run_bench("bench.trainer_overlap", "--epochs", "1", "--batches", "1", "--wait-quiet", "0", "--out", str(out))
    r = json.loads(out.read_text())["trainer"]
    assert set(r["targets_met"]) == {"overlap_speedup_1.3x", "tiny_trainer_peak_rss_below_3GiB"}
    assert len(r["epochs"]) == 3  # one warm-up epoch, then one per mode
    assert r["trainer_peak_rss_mib"] > 0 and r["server_peak_rss_mib"] > 0
    assert "| Overlap speedup" in proc.stdout


def test_kernel_benchmark_cpu_smoke_run(tmp_path):
    out = tmp_path / "kernels.json"
    run_bench(
        "bench.kernels", "--device", "cpu", "--batch", "3", "--dims", "64", "--hidden", "32", "--k", "4",
        "--patches", "16", "--reps", "1", "--no-compile", "--dtype", "fp32", "--out", str(out),
    )  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [(row["op"], row["B"], row["D"]) for row in rows] == [("score fwd", 3, 64), ("hinge fwd+bwd", 3, 64)]
    assert all(row["ms"]["eager"] > 0 for row in rows)
