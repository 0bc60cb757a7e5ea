"""Ray Serve scale-out benchmark: the single process against ``--backend ray`` with 1 and 2
scoring replicas, on the tiny preset, side by side in one run on one machine.

For each server (started as a user starts it, ``advgrpo-reward-server ...``, then stopped):

- ``latency``: one client, one request at a time, two workloads: ``light``, a group of 8 images
  (64x64 RAW) scored by the discriminator alone (the path's own cost shows), and ``full``, the
  same group scored by every model of the tiny preset (dino, pickscore, OCR, and dino_similarity
  against 2 references; OCR dominates). The Ray path's overhead against the single process is the
  difference of the medians.
- ``throughput``: ``--clients`` clients sending ``full`` requests back to back for ``--seconds``:
  images scored per second (after a warm-up).
- ``propagation`` (Ray only): ``--updates`` discriminator updates, one at a time; for each, the
  time from the owner publishing the version (just before it acknowledges the update) to the
  last scoring replica installing it, from the times the replicas report (/v1/stats ``ray``;
  every process on this machine reads the same clock).

On 2 cores, two replicas compete with each other, the ingress, the owner and the clients for the
same two cores: expect no gain, and read the numbers as the cost of the path, not of a cluster.

The Ray replicas run torch with one thread (Ray sets OMP_NUM_THREADS to a replica's ``num_cpus``),
so the single process is measured twice, with torch's default threads and with one.

Run: ``python -m bench.ray_scaleout [--quick]`` (~10 minutes on 2 cores; --quick ~4). Writes
bench/results/ray_scaleout.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from advgrpo.client import Group, RewardClient

from .common import REPO, ServerProcess, machine_info, summary_ms

DEFAULT_OUT = REPO / "bench" / "results" / "ray_scaleout.json"
WEIGHTS = {"dino": 1.0, "pickscore": 0.1, "ocr": 0.1, "dino_similarity": 0.1}
LIGHT = {"dino": 1.0}


def workload(seed: int) -> list[Group]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    refs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    return [Group('a sign that says "cat"', images, "g", references=refs)]


def latency(target: str, n: int, weights: dict[str, float]) -> dict:
    with RewardClient(target, timeout_s=120) as client:
        for k in range(3):  # warm-up
            client.score(workload(k), weights)
        times = []
        for k in range(n):
            t0 = time.perf_counter()
            client.score(workload(k), weights)
            times.append(time.perf_counter() - t0)
    return summary_ms(times)


def throughput(target: str, clients: int, seconds: float) -> dict:
    stop = threading.Event()
    counts = [0] * clients
    errors: list[str] = []

    def run(i: int) -> None:
        with RewardClient(target, timeout_s=120) as client:
            k = 0
            while not stop.is_set():
                try:
                    client.score(workload(1000 * i + k), WEIGHTS)
                except Exception as exc:  # counted, not hidden
                    errors.append(repr(exc))
                    return
                counts[i] += 8
                k += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(min(5.0, seconds / 3))  # warm-up: queues fill, batches form
    start_counts, t0 = sum(counts), time.perf_counter()
    time.sleep(seconds)
    images, elapsed = sum(counts) - start_counts, time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(120)
    return {"clients": clients, "seconds": round(elapsed, 1), "images": images,
            "images_per_s": round(images / elapsed, 1), "errors": errors}  # fmt: skip


def propagation(server: ServerProcess, updates: int) -> dict:
    rng = np.random.default_rng(7)
    lags, replicas_seen = [], set()
    with RewardClient(server.target, timeout_s=120) as client:
        for _ in range(updates):
            refs = [Group("a", [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)])]
            gens = [Group("a", [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)])]
            version = client.update_discriminator("dino", refs, gens).version
            deadline = time.monotonic() + 30
            while True:
                status = httpx.get(f"{server.http}/v1/stats", timeout=10).json()["ray"]
                reps = {rid: r for rid, r in status["replicas"].items() if "dino" in r["versions"]}
                if reps and all(r["versions"]["dino"] >= version for r in reps.values()):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"version {version} did not reach every replica in 30 s: {reps}")
                time.sleep(0.02)
            published = status["owner"]["published_at"]["dino"]
            installed = [r["installed_at"]["dino"] for r in reps.values()]
            lags.append(max(installed) - published)
            replicas_seen.update(reps)
    return {**summary_ms(lags), "max_ms": round(max(lags) * 1000, 2), "replicas": len(replicas_seen)}


def measure(name: str, args: list[str], opts) -> dict:
    t0 = time.perf_counter()
    state = tempfile.mkdtemp(prefix="advgrpo-bench-state-")
    server = ServerProcess(["--preset", "tiny", "--state-dir", state, *args], timeout_s=300)
    started = time.perf_counter() - t0
    try:
        out = {"server": name, "args": args, "start_s": round(started, 1)}
        out["latency"] = {
            "light": latency(server.target, 3 * opts.requests, LIGHT),
            "full": latency(server.target, opts.requests, WEIGHTS),
        }
        out["throughput"] = throughput(server.target, opts.clients, opts.seconds)
        if "--backend" in args:
            out["propagation"] = propagation(server, opts.updates)
        return out
    finally:
        server.stop(60)
        shutil.rmtree(state, ignore_errors=True)


def table(results: list[dict]) -> str:
    base = {k: results[1]["latency"][k]["median_ms"] for k in ("light", "full")}  # 1 thread, like a replica
    lines = [
        "| server | start (s) | 1 client, light: median / p90 ms (vs single, 1 thread) | 1 client, full: median / "
        f"p90 ms (vs single, 1 thread) | full, images/s, {results[0]['throughput']['clients']} clients | "
        "update -> all replicas: median / max ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lat, thr, prop = r["latency"], r["throughput"], r.get("propagation")
        cells = [
            f"{lat[k]['median_ms']} / {lat[k]['p90_ms']} ({lat[k]['median_ms'] - base[k]:+.1f})"
            for k in ("light", "full")
        ]
        lines.append(
            f"| {r['server']} | {r['start_s']} | {cells[0]} | {cells[1]} | {thr['images_per_s']} | "
            + (f"{prop['median_ms']} / {prop['max_ms']} ({prop['replicas']} replicas) |" if prop else "- |")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests, shorter runs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--clients", type=int, default=8)
    opts = p.parse_args(argv)
    opts.requests, opts.seconds, opts.updates = (10, 8.0, 5) if opts.quick else (40, 20.0, 20)
    # Ray gives each replica OMP_NUM_THREADS = its num_cpus (1 here): torch runs one thread per
    # replica. The single process with one torch thread is the like-for-like baseline.
    one_thread = Path(tempfile.mkdtemp(prefix="advgrpo-bench-")) / "one-thread.yaml"
    one_thread.write_text("server: {torch_threads: 1}\n")
    servers = [
        ("single process", []),
        ("single process, 1 torch thread", ["--config", str(one_thread)]),
        ("ray, 1 replica", ["--backend", "ray", "--replicas", "1"]),
        ("ray, 2 replicas", ["--backend", "ray", "--replicas", "2"]),
    ]
    results = [measure(name, args, opts) for name, args in servers]
    single, ray2 = results[1]["throughput"]["images_per_s"], results[3]["throughput"]["images_per_s"]
    report = {
        "machine": machine_info(),
        "quick": opts.quick,
        "weights": WEIGHTS,
        "results": results,
        "ray_2_replicas_over_single_throughput": round(ray2 / single, 3) if single else None,
        # Against the single process with as many torch threads as a replica (one).
        "ray_1_replica_latency_overhead_ms": {
            k: round(results[2]["latency"][k]["median_ms"] - results[1]["latency"][k]["median_ms"], 2)
            for k in ("light", "full")
        },
        "median_propagation_ms": statistics.median(
            [r["propagation"]["median_ms"] for r in results if "propagation" in r]
        ),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
