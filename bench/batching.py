"""Dynamic-batching benchmark, and the tiny preset's peak memory under load.

1. Throughput: 8 concurrent clients score groups of 4 images (64x64 RGB, resized to the tiny
   DINOv2's 56 px input by the model) on a server that hosts only the tiny ``dino`` model. Two
   server processes, identical but for ``batching.enabled``: true (max_batch_size 32,
   max_delay_ms 3) vs false (each request runs alone). Both are up at once and the load alternates
   between them in fixed windows (off, on, off, on, ...) after a warm-up of each, so drift and
   noisy neighbours hit both alike. Reported: images/s over all windows and the speedup; the
   servers' /metrics give the mean batch size and model time per call.

   Clients are threads of this process, each with its own RewardClient (own channel). A blocking
   gRPC call releases the GIL while it waits, and a client's own work per call (wrapping 4 tiny
   arrays, ~50 KB) is small next to the server's; 8 client processes would instead add 8
   interpreters competing with the server for the same 2 cores. The client process's CPU time is
   reported next to the server's so the split is visible.

2. Memory: the full ``--preset tiny`` (dino + pickscore + OCR, batching on as configured) serves a
   mixed load (8 clients: 2 score with all three models, 6 with dino + pickscore; plus
   discriminator updates of both trainable models); then its peak RSS (VmHWM of
   /proc/<pid>/status) is read.

Run: ``python -m bench.batching``.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from .common import ServerProcess, cpu_seconds, proc_status_kib, scrape_metrics, thread_cpu_cores, thread_cpu_seconds

N_CLIENTS = 8
GROUP_IMAGES = 4
IMAGE_SIDE = 64
DINO_PARAMS = {"backbone": "tiny", "image_size": 56, "head_hidden": 64, "num_patches": 8}


def dino_config(enabled: bool, max_batch_size: int = 32, max_delay_ms: float = 3.0) -> dict:
    return {
        "models": {
            "dino": {
                "kind": "dino",
                "weight": 1.0,
                "batching": {
                    "enabled": enabled,
                    "max_batch_size": max_batch_size,
                    "max_delay_ms": max_delay_ms,
                    "max_queue_images": 4096,
                },
                "params": dict(DINO_PARAMS),
            }
        }
    }


def fresh_groups(client: int):
    """A client's endless supply of new groups (GROUP_IMAGES random uint8 images each): every
    request brings images the server has not seen, as generations do, so no content-keyed cache
    or de-duplication can flatter either mode. ~0.1 ms per group."""
    rng = np.random.default_rng(client)
    while True:
        yield [rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8) for _ in range(GROUP_IMAGES)]


def load(
    target: str,
    duration_s: float,
    warmup_s: float,
    n_clients: int = N_CLIENTS,
    weights: dict[str, float] | None | list = None,
    prompt: str = 'a sign that says "hello"',
    supply=None,  # client index -> iterator of groups; default: fresh_groups
) -> dict:
    """n_clients threads call Score back to back; counts what completes inside the window.

    ``weights``: one reward spec for every client, or a list with one per client."""
    from advgrpo.client import Group, RewardClient

    supplies = [(supply or fresh_groups)(i) for i in range(n_clients)]
    per_client = weights if isinstance(weights, list) else [weights] * n_clients
    t_start = time.monotonic()
    t_measure = t_start + warmup_s
    t_end = t_measure + duration_s
    counts = [0] * n_clients
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_clients)

    def worker(i: int) -> None:
        try:
            with RewardClient(target, timeout_s=60) as client:
                barrier.wait(30)
                while True:
                    images = next(supplies[i])
                    t0 = time.monotonic()
                    if t0 >= t_end:
                        return
                    out = client.score([Group(prompt, images)], per_client[i])
                    t1 = time.monotonic()
                    assert len(out[0].rewards) == len(images)
                    if t0 >= t_measure and t1 <= t_end:
                        counts[i] += len(images)
                        latencies[i].append(t1 - t0)
        except BaseException as exc:  # reported below; a failing bench must not pass silently
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(warmup_s + duration_s + 120)
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}") from errors[0]
    lat = np.concatenate([np.asarray(x, dtype=np.float64) for x in latencies] + [np.zeros(0)]) * 1000
    images = sum(counts)
    if lat.size == 0:  # a warm-up only call
        return {"images": 0, "duration_s": duration_s, "requests": 0}
    return {
        "images": images,
        "duration_s": duration_s,
        "images_per_s": round(images / duration_s, 1),
        "requests": int(lat.size),
        "latency_median_ms": round(float(np.median(lat)), 2),
        "latency_p90_ms": round(float(np.percentile(lat, 90)), 2),
    }


def _batch_stats(metrics: dict[str, float], model: str) -> dict:
    def get(name: str) -> float:
        return metrics.get(f'{name}{{model="{model}"}}', 0.0)

    n = get("advgrpo_batch_size_images_count")
    return {
        "model_calls": int(n),
        "mean_batch_images": round(get("advgrpo_batch_size_images_sum") / n, 2) if n else None,
        "mean_requests_per_call": round(get("advgrpo_batch_requests_sum") / n, 2) if n else None,
        "mean_model_ms_per_call": round(get("advgrpo_batch_run_seconds_sum") / n * 1000, 2) if n else None,
    }


def run_throughput(segments: int, segment_s: float, warmup_s: float) -> dict:
    """Both servers up at once; the load alternates between them in ``segments`` windows each
    (off, on, off, on, ...), so drift and noisy neighbours hit both alike."""
    modes = {"off": False, "on": True}
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        servers: dict[str, ServerProcess] = {}
        try:
            for name, enabled in modes.items():
                cfg = Path(tmp) / f"dino-{name}.yaml"
                cfg.write_text(yaml.safe_dump(dino_config(enabled)))
                servers[name] = ServerProcess(["--config", str(cfg)], log_level="WARNING")
            for name in modes:
                load(servers[name].target, 0.0, warmup_s)  # warm-up, not counted
            per: dict[str, list[dict]] = {name: [] for name in modes}
            cpu = {name: [0.0, 0.0, 0.0] for name in modes}  # server cpu, client cpu, wall
            threads: dict[str, list] = {}
            for seg in range(segments):
                for name in modes:
                    pid = servers[name].pid
                    s0, c0, w0 = cpu_seconds(pid), time.process_time(), time.monotonic()
                    th0 = thread_cpu_seconds(pid)
                    per[name].append(load(servers[name].target, segment_s, 0.5))
                    cpu[name][0] += cpu_seconds(pid) - s0
                    cpu[name][1] += time.process_time() - c0
                    cpu[name][2] += time.monotonic() - w0
                    if seg == segments - 1:  # where the server's CPU goes, by thread (last window)
                        threads[name] = thread_cpu_cores(th0, thread_cpu_seconds(pid), time.monotonic() - w0)
            batch = {name: _batch_stats(scrape_metrics(servers[name].http), "dino") for name in modes}
        finally:
            for server in servers.values():
                server.stop()
    out = {}
    for name, enabled in modes.items():
        segs = per[name]
        images = sum(r["images"] for r in segs)
        duration = sum(r["duration_s"] for r in segs)
        out[name] = {
            "batching": dict(dino_config(enabled)["models"]["dino"]["batching"]),
            "images": images,
            "duration_s": duration,
            "images_per_s": round(images / duration, 1),
            "images_per_s_by_segment": [r["images_per_s"] for r in segs],
            "latency_median_ms_by_segment": [r["latency_median_ms"] for r in segs],
            "latency_p90_ms_by_segment": [r["latency_p90_ms"] for r in segs],
            "server_cpu_cores": round(cpu[name][0] / cpu[name][2], 2),
            "client_cpu_cores": round(cpu[name][1] / cpu[name][2], 2),
            "server_busiest_threads_cores": threads[name],
            **batch[name],  # from the server's /metrics, warm-up included
        }
    return out


def run_memory(duration_s: float, updates: int = 4) -> dict:
    """Full tiny preset under a mixed load; peak RSS afterwards."""
    from advgrpo.client import Group, RewardClient

    from .transport import photo_like_images

    # Two clients ask for all three models (OCR, ~250 ms an image here, is the slow one); the other
    # six for dino + pickscore, so the batched models see real concurrency too.
    all_three = {"dino": 1.0, "pickscore": 1.0, "ocr": 1.0}
    two = {"dino": 1.0, "pickscore": 1.0}
    weights = [all_three] * 2 + [two] * (N_CLIENTS - 2)
    # 256 px photo-like images: realistic enough for OCR and CLIP preprocessing, small enough for 2 cores.
    groups = [photo_like_images(GROUP_IMAGES, 256, seed=i) for i in range(N_CLIENTS)]

    def varied(client: int):
        """The client's group, shifted and stamped anew for every request: new content each time
        (as generations are), so the DINO feature cache fills up the way it would in training."""
        for n in itertools.count(1):
            images = [np.roll(img, n % 256, axis=1) for img in groups[client]]
            for img in images:
                img[0, 0, :] = np.frombuffer(n.to_bytes(3, "little"), dtype=np.uint8)
            yield images

    with tempfile.TemporaryDirectory(prefix="bench-rss-") as state:
        server = ServerProcess(["--preset", "tiny", "--state-dir", state], log_level="WARNING")
        try:
            rss_idle_kib = proc_status_kib(server.pid, "VmRSS")
            stop = threading.Event()
            update_errors: list[BaseException] = []

            def updater() -> None:
                try:
                    with RewardClient(server.target, timeout_s=120) as c:
                        for _ in range(updates):
                            if stop.is_set():
                                return
                            for model in ("dino", "pickscore"):
                                c.update_discriminator(
                                    model,
                                    [Group('a sign that says "hello"', groups[0])],
                                    [Group('a sign that says "hello"', groups[1])],
                                    steps=2,
                                )
                            time.sleep(duration_s / (updates + 1))
                except BaseException as exc:
                    update_errors.append(exc)

            t = threading.Thread(target=updater, daemon=True)
            t.start()
            result = load(server.target, duration_s, 1.0, weights=weights, supply=varied)
            stop.set()
            t.join(60)
            if update_errors:
                raise RuntimeError(f"discriminator update failed: {update_errors[0]!r}")
            hwm = proc_status_kib(server.pid, "VmHWM")
            rss = proc_status_kib(server.pid, "VmRSS")
            metrics = scrape_metrics(server.http)
            cache = {
                key: metrics.get(f'advgrpo_feature_cache_{key}{{model="dino"}}')
                for key in ("entries", "bytes", "hits_total", "misses_total")
            }
        finally:
            server.stop()
    return {
        "preset": "tiny (dino + pickscore + ocr), batching as configured",
        "load": f"{N_CLIENTS} clients x groups of {GROUP_IMAGES} new 256x256 images for {duration_s:.0f} s "
        f"(2 with dino+pickscore+ocr, {N_CLIENTS - 2} with dino+pickscore) + {updates} rounds of "
        "discriminator updates (dino, pickscore; 2 steps each)",
        "scored_images": result["images"],
        "dino_feature_cache": cache,  # None where the server has no such metric
        "rss_after_start_mib": round(rss_idle_kib / 1024, 1),
        "rss_after_load_mib": round(rss / 1024, 1),
        "peak_rss_mib": round(hwm / 1024, 1),
        "target_peak_rss_mib": 1536,
    }


def run(segments: int = 4, segment_s: float = 6.0, warmup_s: float = 3.0, memory_duration_s: float = 20.0) -> dict:
    t = run_throughput(segments, segment_s, warmup_s)
    off, on = t["off"], t["on"]
    return {
        "clients": N_CLIENTS,
        "method": f"{segments} alternating windows of {segment_s:.0f} s per mode after a {warmup_s:.0f} s warm-up",
        "group": f"{GROUP_IMAGES} images {IMAGE_SIDE}x{IMAGE_SIDE} RGB uint8",
        "model": {"kind": "dino", "params": DINO_PARAMS},
        "batching_off": off,
        "batching_on": on,
        "speedup": round(on["images_per_s"] / off["images_per_s"], 2),
        "target_speedup": 1.5,
        "memory": run_memory(memory_duration_s),
    }


def main() -> int:
    print(json.dumps(run(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
