"""Runs every reward-server benchmark, prints a markdown table, writes bench/results/reward_server.json.

``make bench`` calls this. About 2-3 minutes on a 2-core CPU machine; no GPU needed. Figures in
docs/PERFORMANCE.md are pasted from one run of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import batching, transport
from .common import REPO, machine_info

DEFAULT_OUT = REPO / "bench" / "results" / "reward_server.json"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(results: dict) -> str:
    m = results["machine"]
    t = results["transport"]
    d = results.get("transport_malloc_diagnostic")
    b = results["batching"]
    mem = b["memory"]
    target = t["target_speedup"]

    def timing(label: str, key: str) -> tuple[str, str, str, str]:
        return (label, f"{t[key]['median_ms']:.1f} / {t[key]['p90_ms']:.1f} ms", "", "")

    def speedup(label: str, key: str, paired: str) -> tuple[str, str, str, str]:
        p = t["paired_speedup"][paired]
        rounds = (
            f"{t[key]:.2f}x (per round: median {p['median']:.2f}x, 10th percentile {p['p10']:.2f}x, "
            f"{p['rounds_at_target']}/{p['rounds']} rounds >= {target:.0f}x)"
        )
        return (label, rounds, f">= {target:.0f}x", _met(t[key] >= target))

    rows = [
        timing(
            f"Transport: 16x512² group, ours unary `Score` (raw RGB8, client default: "
            f"{t['ours_unary']['score_calls_per_group']} concurrent calls)",
            "ours_unary",
        ),
        timing(
            "Transport: ours, one unary `Score` call carrying the whole group (`parallel_calls=1`)",
            "ours_unary_single_call",
        ),
        timing("Transport: ours `ScoreStream`, per group", "ours_stream"),
        timing("Transport: ours unary `Score`, `shared_memory=True` (same host)", "ours_unary_shared_memory"),
        timing(
            "Transport: ours `ScoreStream`, `shared_memory=True` (same host), per group", "ours_stream_shared_memory"
        ),
        timing("Transport: baseline pickle+HTTP, JPEG q75", "baseline_pickle_http_jpeg"),
        speedup("Transport speedup, unary (baseline / ours, medians)", "speedup_unary_median", "unary"),
        speedup(
            "Transport speedup, one unary call per group (baseline / ours, medians)",
            "speedup_unary_single_call_median",
            "unary_single_call",
        ),
        speedup("Transport speedup, stream (baseline / ours, medians)", "speedup_stream_median", "stream"),
        speedup(
            "Transport speedup, unary through shared memory (baseline / ours, medians)",
            "speedup_unary_shared_memory_median",
            "unary_shared_memory",
        ),
        speedup(
            "Transport speedup, stream through shared memory (baseline / ours, medians)",
            "speedup_stream_shared_memory_median",
            "stream_shared_memory",
        ),
    ]
    if d:
        rows.append(
            (
                "(diagnostic, glibc keeps freed memory) unary / stream / baseline medians",
                f"{d['ours_unary']['median_ms']:.1f} / {d['ours_stream']['median_ms']:.1f} / "
                f"{d['baseline_pickle_http_jpeg']['median_ms']:.1f} ms "
                f"({d['speedup_unary_median']:.2f}x / {d['speedup_stream_median']:.2f}x)",
                "n/a",
                "",
            )
        )
    off, on = b["batching_off"], b["batching_on"]
    rows += [
        (
            "Batching off: tiny dino, 8 clients x 4 imgs 64²",
            f"{off['images_per_s']:.0f} img/s "
            f"(batch {off['mean_batch_images']}, {off['mean_model_ms_per_call']} ms/call)",
            "",
            "",
        ),
        (
            "Batching on (max 32 imgs, 3 ms)",
            f"{on['images_per_s']:.0f} img/s (batch {on['mean_batch_images']}, {on['mean_model_ms_per_call']} ms/call)",
            "",
            "",
        ),
        (
            "Batching speedup",
            f"{b['speedup']:.2f}x",
            f">= {b['target_speedup']}x",
            _met(b["speedup"] >= b["target_speedup"]),
        ),
        (
            "Peak RSS, `--preset tiny` after load (VmHWM)",
            f"{mem['peak_rss_mib']:.0f} MiB",
            f"< {mem['target_peak_rss_mib']} MiB",
            _met(mem["peak_rss_mib"] < mem["target_peak_rss_mib"]),
        ),
    ]
    lines = ["SMOKE RUN (--quick): too few rounds for the figures to mean anything", ""] if results.get("quick") else []
    lines += [
        f"Machine: {m['cpu_model']} ({m.get('cpu_id', '')}), {m['cpu_cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']}; "
        f"Python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}; {m['date']}; "
        f"load average before/after: {m.get('loadavg_1m_before', 0):.2f}/{m.get('loadavg_1m_after', 0):.2f}",
        "",
        "| Benchmark | Result (median / p90) | Target | Met |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {a} | {r} | {tg} | {ok} |" for a, r, tg, ok in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    p.add_argument("--no-diagnostic", action="store_true", help="skip the malloc diagnostic run of the transport bench")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (2 transport rounds, 1 s batching windows; implies --no-diagnostic): checks that "
        "every benchmark runs, its figures mean nothing",
    )
    args = p.parse_args(argv)

    t0 = time.monotonic()
    results: dict = {"machine": machine_info()}
    # Other processes on the machine distort every figure here: record how busy it was.
    results["machine"]["loadavg_1m_before"] = os.getloadavg()[0]
    if results["machine"]["loadavg_1m_before"] > 0.5:
        print(
            f"warning: load average {results['machine']['loadavg_1m_before']:.2f} before the run; "
            "other work on this machine will skew the figures",
            file=sys.stderr,
        )
    print("transport ...", file=sys.stderr, flush=True)
    results["quick"] = args.quick
    results["transport"] = (
        transport.run(rounds=2, warmup=1, streams=1, stream_groups=2) if args.quick else transport.run()
    )
    if not (args.no_diagnostic or args.quick):
        print("transport (malloc diagnostic) ...", file=sys.stderr, flush=True)
        results["transport_malloc_diagnostic"] = transport.run_malloc_diagnostic()
    print("batching + memory ...", file=sys.stderr, flush=True)
    results["batching"] = (
        batching.run(segments=1, segment_s=1.0, warmup_s=0.5, memory_duration_s=2.0) if args.quick else batching.run()
    )
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    results["targets_met"] = {
        "transport_speedup_3x_unary": results["transport"]["speedup_unary_median"] >= 3.0,
        "transport_speedup_3x_stream": results["transport"]["speedup_stream_median"] >= 3.0,
        "transport_speedup_3x_unary_shared_memory": results["transport"]["speedup_unary_shared_memory_median"] >= 3.0,
        "batching_speedup_1.5x": results["batching"]["speedup"] >= 1.5,
        "tiny_preset_peak_rss_below_1.5GiB": results["batching"]["memory"]["peak_rss_mib"] < 1536,
    }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(
        f"\n(full results: {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}; "
        f"{results['wall_s']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
