"""Transport benchmark: one 16-image 512x512 RGB group round trip through a no-op model.

Compared side by side, in one run, interleaved round by round:

* ours, unary ``Score``: ``RewardClient.score`` against a real ``--preset noop`` server process,
  raw RGB8 encoding, client defaults: the 12.6 MB group goes as 3 concurrent Score calls of 4-6
  images (``parallel_calls``, ``min_call_bytes``);
* ours, one unary ``Score`` call carrying the whole group (``parallel_calls=1``): what a client
  that sends one message per group gets;
* ours, ``ScoreStream``: ``RewardClient.score_stream`` over 8 copies of the group; the per-group
  time is the stream's total time / 8 (the stream pipelines groups), over 8 such streams;
* ours, unary ``Score`` and ``ScoreStream`` with ``shared_memory=True``: the same calls, the pixels
  passed through /dev/shm segments (for a trainer on the server's host); interleaved with the
  others;
* baseline: Flow-GRPO's pickle-over-HTTP reward server (bench/pickle_baseline.py, a separate
  Flask/werkzeug process): JPEG q75 encode + pickle + HTTP POST + unpickle + JPEG decode.

Every timing starts from uint8 HWC arrays in the client and ends with the rewards as Python floats,
so encoding and decoding are on the clock for both. Run: ``python -m bench.transport``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time

import numpy as np

from .common import REPO, ServerProcess, cpu_seconds, minor_faults, summary_ms

GROUP_SIZE = 16
SIDE = 512
PROMPT = "a photo of a red fox in the snow"

# Diagnostic only (never used for the headline figures): glibc told to keep freed memory instead
# of returning it to the kernel, so a buffer of a few MiB does not have to be page-faulted in
# afresh on every call. Applied to the client and both servers alike.
MALLOC_KEEP_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str((1 << 32) - 1),
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def photo_like_images(n: int = GROUP_SIZE, side: int = SIDE, seed: int = 0) -> list[np.ndarray]:
    """Deterministic images with the statistics JPEG sees in generations: smooth colour fields,
    a few hard-edged shapes, and mild noise (pure noise would make JPEG look worse than it is)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1)
    images = []
    for _ in range(n):
        c = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        img = (
            c[0] * (1 - x)[..., None] * (1 - y)[..., None]
            + c[1] * x[..., None]
            + c[2] * y[..., None] * (1 - x)[..., None]
        )
        for _ in range(6):  # ellipses
            cy, cx = rng.uniform(0, 1, 2)
            ry, rx = rng.uniform(0.05, 0.25, 2)
            mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
            img[mask] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


class BaselineProcess:
    """``python -m bench.pickle_baseline`` on 127.0.0.1, port from its first stdout line."""

    def __init__(self, timeout_s: float = 30.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.pickle_baseline"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line: list[str] = []
        t = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout_s)
        if not line or not line[0].startswith("{"):
            self.stop()
            raise RuntimeError("pickle baseline server did not start")
        self.url = f"http://127.0.0.1:{json.loads(line[0])['port']}/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def paired_speedup(baseline: list[float], ours: list[float], target: float) -> dict:
    """Per-round ratios baseline / ours of rounds run back to back: drift of the machine between
    rounds cancels out. The median, the 10th percentile, and how many rounds reached ``target``."""
    r = np.asarray(baseline, dtype=np.float64) / np.asarray(ours, dtype=np.float64)
    return {
        "median": round(float(np.median(r)), 2),
        "p10": round(float(np.percentile(r, 10)), 2),
        "rounds_at_target": int((r >= target).sum()),
        "rounds": int(r.size),
    }


TARGET_SPEEDUP = 3.0


def run(rounds: int = 30, warmup: int = 3, streams: int = 8, stream_groups: int = 8) -> dict:
    import httpx

    from advgrpo.client import Group, RewardClient

    from . import pickle_baseline as baseline

    images = photo_like_images()
    prompts = [PROMPT] * len(images)
    group = Group(PROMPT, images)

    server = ServerProcess(["--preset", "noop"], http=False, log_level="WARNING")
    base = BaselineProcess()
    try:
        client = RewardClient(server.target, timeout_s=60, keep_freed_memory=True)  # as the trainer does
        client.wait_ready(30)
        shm_client = RewardClient(server.target, timeout_s=60, keep_freed_memory=True, shared_memory=True)
        single_client = RewardClient(server.target, timeout_s=60, keep_freed_memory=True, parallel_calls=1)
        encoded = [client._encode_group(group, 0)]  # how the client divides this group into calls
        calls_per_group = len(list(client._requests(encoded, {}, client._call_budget(encoded))))
        # Flow-GRPO's client uses requests.Session; httpx.Client (a declared dependency) is the same
        # thing here: a synchronous client that keeps the connection alive between calls.
        session = httpx.Client(timeout=60)

        faults = {"ours": [0, 0], "baseline": [0, 0]}  # [client, server] minor page faults
        server_cpu = {"ours": 0.0, "baseline": 0.0}

        def counted(name: str, server_pid: int, fn):
            c0, s0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, minor_faults(server_pid)
            cpu0 = cpu_seconds(server_pid)
            dt = fn()
            faults[name][0] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - c0
            faults[name][1] += minor_faults(server_pid) - s0
            server_cpu[name] += cpu_seconds(server_pid) - cpu0
            return dt

        def ours_unary(c=client) -> float:
            t0 = time.perf_counter()
            out = c.score([group])
            dt = time.perf_counter() - t0
            assert len(out) == 1 and len(out[0].rewards) == GROUP_SIZE
            return dt

        def ours_shared() -> float:
            return ours_unary(shm_client)

        def ours_single() -> float:
            return ours_unary(single_client)

        encode_times: list[float] = []

        def pickle_http() -> float:
            t0 = time.perf_counter()
            body = baseline.encode_request(images, prompts)
            encode_times.append(time.perf_counter() - t0)
            r = session.post(base.url, content=body)
            r.raise_for_status()
            scores = baseline.decode_response(r.content)
            dt = time.perf_counter() - t0
            assert len(scores) == GROUP_SIZE
            return dt

        def ours_stream(c=client) -> float:
            """Per-group time of one stream of ``stream_groups`` groups: total time / groups."""
            t0 = time.perf_counter()
            n = 0
            for score in c.score_stream(group for _ in range(stream_groups)):
                assert len(score.rewards) == GROUP_SIZE
                n += 1
            assert n == stream_groups
            return (time.perf_counter() - t0) / stream_groups

        for _ in range(warmup):
            ours_unary()
            ours_shared()
            ours_single()
            pickle_http()
        ours_stream()
        ours_stream(shm_client)

        unary, pickled, shared, single = [], [], [], []
        encode_times.clear()
        for _ in range(rounds):  # interleaved: drift and noise hit all alike
            unary.append(counted("ours", server.pid, ours_unary))
            pickled.append(counted("baseline", base.proc.pid, pickle_http))
            shared.append(ours_shared())
            single.append(ours_single())
        stream, stream_shared, stream_baseline = [], [], []
        for _ in range(streams):  # interleaved, with a baseline round each to pair them with
            stream.append(ours_stream())
            stream_shared.append(ours_stream(shm_client))
            stream_baseline.append(pickle_http())
        client_profile = profile_calls(lambda: client.score([group]), calls=5)

        raw_bytes = sum(img.nbytes for img in images)
        jpeg_body = len(baseline.encode_request(images, prompts))
        session.close()
        client.close()
        shm_client.close()
        single_client.close()
    finally:
        base.stop()
        server.stop()

    res_unary, res_pickle = summary_ms(unary), summary_ms(pickled)
    res_stream, res_shared = summary_ms(stream), summary_ms(shared)
    res_single, res_stream_shared = summary_ms(single), summary_ms(stream_shared)
    res_pickle["client_jpeg_pickle_encode_median_ms"] = summary_ms(encode_times)["median_ms"]
    return {
        "group": f"{GROUP_SIZE} images {SIDE}x{SIDE} RGB uint8",
        "rounds": rounds,
        "warmup": warmup,
        "streams": f"{streams} streams x {stream_groups} groups; per-group time = stream time / groups",
        "bytes_per_group": {"ours_raw_rgb8": raw_bytes, "baseline_pickled_jpeg_q75": jpeg_body},
        "ours_unary": {**res_unary, "score_calls_per_group": calls_per_group},
        "ours_unary_single_call": res_single,
        "ours_stream": res_stream,
        "ours_unary_shared_memory": res_shared,
        "ours_stream_shared_memory": res_stream_shared,
        "baseline_pickle_http_jpeg": res_pickle,
        "minor_page_faults_per_round_trip": {
            name: {"client": round(c / rounds), "server": round(sv / rounds)} for name, (c, sv) in faults.items()
        },
        "server_cpu_ms_per_round_trip": {k: round(v / rounds * 1000, 1) for k, v in server_cpu.items()},
        "ours_unary_client_profile": client_profile,
        "speedup_unary_median": round(res_pickle["median_ms"] / res_unary["median_ms"], 2),
        "speedup_unary_single_call_median": round(res_pickle["median_ms"] / res_single["median_ms"], 2),
        "speedup_stream_median": round(res_pickle["median_ms"] / res_stream["median_ms"], 2),
        "speedup_unary_shared_memory_median": round(res_pickle["median_ms"] / res_shared["median_ms"], 2),
        "speedup_stream_shared_memory_median": round(res_pickle["median_ms"] / res_stream_shared["median_ms"], 2),
        "paired_speedup": {
            "unary": paired_speedup(pickled, unary, TARGET_SPEEDUP),
            "unary_single_call": paired_speedup(pickled, single, TARGET_SPEEDUP),
            "unary_shared_memory": paired_speedup(pickled, shared, TARGET_SPEEDUP),
            "stream": paired_speedup(stream_baseline, stream, TARGET_SPEEDUP),
            "stream_shared_memory": paired_speedup(stream_baseline, stream_shared, TARGET_SPEEDUP),
        },
        "target_speedup": TARGET_SPEEDUP,
    }


def profile_calls(fn, calls: int = 5, top: int = 6) -> list[dict]:
    """cProfile of ``calls`` calls: the functions with the most own time, in ms per call. This is
    where the client thread's time goes (the server's part shows up as the blocking RPC wait)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        {
            "function": re.sub(r"^.*?(site-packages/|/(?=(reward_server|bench)/))", "", pstats.func_std_string(func)),
            "calls_per_call": round(st[1] / calls, 1),
            "own_ms_per_call": round(st[2] / calls * 1000, 2),
        }
        for func, st in rows
    ]


def run_malloc_diagnostic(rounds: int = 10, streams: int = 4, timeout_s: float = 120.0) -> dict:
    """The same benchmark in a child process with MALLOC_KEEP_ENV (see above): how much of the
    time is the kernel handing out fresh pages. A diagnostic, not a headline figure."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.transport", "--rounds", str(rounds), "--streams", str(streams)],
        cwd=REPO,
        env={**os.environ, **MALLOC_KEEP_ENV},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    result = json.loads(out.stdout)
    result["env"] = MALLOC_KEEP_ENV
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream-groups", type=int, default=8)
    args = p.parse_args(argv)
    print(json.dumps(run(rounds=args.rounds, streams=args.streams, stream_groups=args.stream_groups), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
