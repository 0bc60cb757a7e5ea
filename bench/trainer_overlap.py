"""Trainer benchmark: epoch time of the tiny recipe with reward scoring overlapped vs sequential,
and the peak RSS of the tiny preset's run.

Setup (printed with the results):

* One reward-server process hosting only a ``dino`` model: the tiny DINOv2 backbone at
  ``image_size`` 336 (576 patch tokens an image), so scoring a 32x32 generation costs about as
  much as sampling it on this CPU (reward time ~ sampling time per epoch, measured): rewards are
  a meaningful share of the epoch. ``server.torch_threads: 1``. Batching on with
  ``max_delay_ms: 0``: a partial batch never waits for company, so the sequential baseline (one
  request in flight at a time: nothing could join it) is not charged a delay it cannot benefit
  from (with the default 5 ms it would pay ~5 ms on each of its ~52 calls an epoch); streamed
  requests still merge when they queue behind a running batch.
* The trainer: the tiny preset (``advgrpo.trainer.loop.AdvGrpoTrainer``, 32 px, 4 steps, batch 8,
  group 4) on the random in-memory tiny SD3 (``model.pretrained=tiny``: the preset's model when
  these figures were first taken; the preset now runs the toy SD3) with ``sampling.batches_per_epoch`` 8 (64 images an epoch, 16 groups of 4),
  the discriminator off (``adversarial.discriminator=`` and a prompts file: every epoch is
  sample -> rewards -> one GRPO step, so all epochs are alike and the only server work is the
  epoch's rewards), tensorboard off, in a subprocess with ``OMP_NUM_THREADS=1`` and
  ``torch.set_num_threads(1)``.
* ``--pin split`` (default when >= 2 CPUs): the trainer runs on CPU 0 and the server on CPU 1
  (sched_setaffinity on every thread): two one-thread "devices" that cannot steal each other's
  core. ``--pin none`` leaves placement to the kernel.
* Side by side: ONE trainer process alternates ``reward.overlap`` true/false epoch by epoch
  (the trainer reads it at the start of each epoch), in ABBA blocks after one warm-up epoch, on
  one server (the discriminator never trains: its state is the same for every epoch). This
  machine's speed drifts by up to 2x over tens of seconds (other processes, and a shared host
  whose steal the VM does not see: the trainer's own CPU seconds for identical epochs vary
  alike), so separate runs per mode (~30 s each) disagreed between attempts (1.85x, 1.49x,
  0.99x); adjacent epochs of one process see the same conditions. Each epoch records the CPU
  time of processes other than ours (``/proc/stat`` busy time minus the two processes' own).
  ``--sequential-runs N`` adds the literal method (``python -m advgrpo.trainer.train`` once per mode)
  as a cross-check.
* The RSS target: the unmodified tiny preset (``python -m advgrpo.trainer.train --preset tiny`` with a
  synthetic reference set: discriminator updates, eval, checkpoint) as its own subprocess, after
  the timing; peak RSS from ``wait4``'s ru_maxrss (exact, that process only). The server's peak
  is its VmHWM.

Reported per mode: median epoch time (p25-p75) and its split (the trainer's own time_sample_s /
time_reward_s / time_train_s: in overlapped mode time_reward_s is only the wait after the last
batch is sampled), the speedup (median sequential / median overlapped; also the median ratio of
adjacent pairs), the bound a perfect pipeline reaches from the sequential split, the server's
model time per image in each mode (its /metrics) and the foreign CPU share.

Run: ``python -m bench.trainer_overlap`` (about 1.5 minutes on 2 CPU cores, after waiting up to
``--wait-quiet`` 60 s for other processes to go idle). Writes
bench/results/trainer.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .common import REPO, ServerProcess, cpu_seconds, machine_info, proc_status_kib, scrape_metrics

DEFAULT_OUT = REPO / "bench" / "results" / "trainer.json"
PROMPTS = [
    "a red apple on a table",
    "a blue car in the rain",
    "a green tree on a hill",
    "a yellow sun over the sea",
    "a white cat on a sofa",
    "a black dog in the snow",
    "a tall tower at night",
    "a small boat on a lake",
    "a brown horse in a field",
    "an orange fish in a bowl",
    "a purple flower in a vase",
    "a grey owl on a branch",
    "a pink cake on a plate",
    "a silver train in a station",
    "a wooden chair by a window",
    "a glass of milk",
]
TARGET_SPEEDUP = 1.3
TARGET_RSS_MIB = 3 * 1024
TIME_KEYS = ("time_epoch_s", "time_sample_s", "time_reward_s", "time_train_s")


def server_config(image_size: int) -> dict:
    return {
        "server": {"torch_threads": 1},
        "models": {
            "dino": {
                "kind": "dino",
                "weight": 1.0,
                "batching": {"enabled": True, "max_batch_size": 32, "max_delay_ms": 0.0},
                "params": {"backbone": "tiny", "image_size": image_size, "head_hidden": 64, "num_patches": 8},
            }
        },
    }


def trainer_sets(prompts: Path | str, batches: int) -> list[str]:
    return [
        # The random in-memory tiny SD3 (the tiny preset's model until it moved to the toy SD3),
        # so that the recorded overlap figures keep their meaning.
        "model.pretrained=tiny",
        "model.max_sequence_length=16",
        "adversarial.discriminator=",
        f"data.prompts={prompts}",
        f"sampling.batches_per_epoch={batches}",
        "run.tensorboard=false",
    ]


def abba(n_per_mode: int) -> list[bool]:
    """True (overlap), False, False, True, ... : n_per_mode of each; adjacent pairs cancel drift."""
    block = [True, False, False, True]
    out = (block * (n_per_mode // 2 + 1))[: 2 * n_per_mode]
    return out


def pin_process(pid: int, cpus: set[int]) -> None:
    """Affinity of every thread of ``pid`` (threads made later inherit it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass


def machine_busy_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from the first line of /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = f[:8]
    return (user + nice + system + irq + softirq + steal) / hz, steal / hz


def wait_quiet(max_wait_s: float, max_busy_cores: float = 0.15, window_s: float = 2.0) -> dict:
    """Waits (at most ``max_wait_s``) for a ``window_s`` window in which the machine's busy CPU is
    below ``max_busy_cores``: other processes' bursts would skew the comparison."""
    t0 = time.monotonic()
    busy = None
    while True:
        b0 = machine_busy_s()[0]
        time.sleep(window_s)
        busy = (machine_busy_s()[0] - b0) / window_s
        if busy < max_busy_cores or time.monotonic() - t0 >= max_wait_s:
            return {"waited_s": round(time.monotonic() - t0, 1), "busy_cores_at_start": round(busy, 3),
                    "quiet": busy < max_busy_cores}  # fmt: skip


def model_totals(http: str) -> dict[str, float]:
    m = scrape_metrics(http)

    def get(name: str) -> float:
        return m.get(f'{name}{{model="dino"}}', 0.0)

    return {
        "calls": get("advgrpo_batch_run_seconds_count"),
        "run_s": get("advgrpo_batch_run_seconds_sum"),
        "images": get("advgrpo_batch_size_images_sum"),
    }


# ----------------------------------------------------------------------------- worker (subprocess)


def worker(spec_path: Path) -> int:
    """The trainer process: one AdvGrpoTrainer, ``reward.overlap`` set per epoch from the schedule."""
    import torch

    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    from advgrpo.trainer.config import load_train_config
    from advgrpo.trainer.loop import AdvGrpoTrainer

    cfg = load_train_config(
        "tiny",
        sets=spec["sets"],
        overrides={"reward": {"server": spec["target"]}, "run": {"output_dir": spec["out"]}},
    )
    trainer = AdvGrpoTrainer(cfg)
    server_pid, http = spec["server_pid"], spec["http"]
    records = []
    for epoch, overlap in enumerate(spec["schedule"]):
        cfg.reward.overlap = overlap  # read by train_epoch when it opens the epoch's RewardStream
        m0 = model_totals(http)
        busy0, steal0 = machine_busy_s()
        own0, srv0 = _self_cpu_s(), cpu_seconds(server_pid)
        t0 = time.perf_counter()
        metrics = trainer.train_epoch(epoch)
        wall = time.perf_counter() - t0
        own, srv = _self_cpu_s() - own0, cpu_seconds(server_pid) - srv0
        busy1, steal1 = machine_busy_s()
        m1 = model_totals(http)
        records.append(
            {
                "epoch": epoch,
                "overlap": overlap,
                **{k: round(metrics[k], 4) for k in TIME_KEYS},
                "trainer_cpu_s": round(own, 3),
                "server_cpu_s": round(srv, 3),
                # Machine-wide busy CPU time not spent by the trainer or the server, as cores.
                "foreign_cpu_cores": round(max(0.0, busy1 - busy0 - own - srv) / wall, 3),
                "steal_cores": round((steal1 - steal0) / wall, 3),
                "server_model_s": round(m1["run_s"] - m0["run_s"], 4),
                "server_model_calls": int(m1["calls"] - m0["calls"]),
                "server_images": int(m1["images"] - m0["images"]),
            }
        )
    for closable in (trainer.metrics, getattr(trainer, "reward_log", None), trainer.client):
        if closable is not None:
            closable.close()
    Path(spec["result"]).write_text(json.dumps(records))
    return 0


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----------------------------------------------------------------------------- driver


def run_child(cmd: list[str], log: Path, cpus: set[int] | None, timeout_s: float) -> tuple[float, float, float]:
    """Runs ``cmd`` (one thread for torch, pinned to ``cpus``); returns (wall s, peak RSS MiB, CPU s).
    Peak RSS is ru_maxrss from wait4: that child's own, exact."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{cmd[2]} timed out after {timeout_s:.0f} s; log: {log}")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    return time.monotonic() - t0, rusage.ru_maxrss / 1024, rusage.ru_utime + rusage.ru_stime


def summarise(records: list[dict]) -> dict:
    out: dict = {"n_epochs": len(records)}
    for k in TIME_KEYS:
        out[f"median_{k[len('time_') :]}"] = round(statistics.median(r[k] for r in records), 4)
    epochs = [r["time_epoch_s"] for r in records]
    # quantiles needs two points; a one-epoch smoke run (--epochs 1) has one per mode
    q = statistics.quantiles(epochs, n=4) if len(epochs) > 1 else epochs * 3
    out.update(p25_epoch_s=round(q[0], 4), p75_epoch_s=round(q[2], 4), mean_epoch_s=round(statistics.fmean(epochs), 4))
    out["epoch_s_all"] = epochs
    images = sum(r["server_images"] for r in records)
    model_s = sum(r["server_model_s"] for r in records)
    out["server_ms_per_image"] = round(model_s / images * 1000, 3)
    out["server_model_s_per_epoch"] = round(model_s / len(records), 4)
    out["server_calls_per_epoch"] = round(sum(r["server_model_calls"] for r in records) / len(records), 1)
    out["server_images_per_call"] = round(images / sum(r["server_model_calls"] for r in records), 2)
    wall = sum(epochs)
    out["trainer_cpu_cores"] = round(sum(r["trainer_cpu_s"] for r in records) / wall, 3)
    out["server_cpu_cores"] = round(sum(r["server_cpu_s"] for r in records) / wall, 3)
    out["median_foreign_cpu_cores"] = round(statistics.median(r["foreign_cpu_cores"] for r in records), 3)
    return out


def pipeline_bound(seq: dict, batches: int, reward_s: float | None = None) -> dict:
    """What perfect overlap could reach from the sequential split: batch b's rewards run while
    batch b+1 samples; the last batch's rewards and the GRPO step overlap nothing. ``reward_s``
    replaces the sequential reward time (e.g. by the server's model time in streamed mode)."""
    s, t = seq["median_sample_s"], seq["median_train_s"]
    r = seq["median_reward_s"] if reward_s is None else reward_s
    sb, rb = s / batches, r / batches
    overlapped = sb + (batches - 1) * max(sb, rb) + rb + t
    sequential = s + seq["median_reward_s"] + t
    return {
        "sequential_s": round(sequential, 4),
        "overlapped_s": round(overlapped, 4),
        "speedup": round(sequential / overlapped, 3),
    }


def pair_ratios(records: list[dict]) -> list[float]:
    """sequential / overlapped for each adjacent (ABBA) pair of measured epochs."""
    out = []
    for a, b in zip(records[0::2], records[1::2], strict=False):
        if a["overlap"] != b["overlap"]:
            on, off = (a, b) if a["overlap"] else (b, a)
            out.append(round(off["time_epoch_s"] / on["time_epoch_s"], 3))
    return out


def quiet_pairs(records: list[dict], max_foreign_cores: float = 0.1) -> list[float]:
    """pair_ratios over the pairs whose both epochs saw less than ``max_foreign_cores`` of other
    processes' CPU: the speedup where nobody else was competing."""
    pairs = [(a, b) for a, b in zip(records[0::2], records[1::2], strict=False)]
    keep = [x for ab in pairs if all(r["foreign_cpu_cores"] < max_foreign_cores for r in ab) for x in ab]
    return pair_ratios(keep)


def run(
    epochs: int = 10,
    batches: int = 8,
    image_size: int = 336,
    pin: str = "auto",
    sequential_runs: int = 0,
) -> dict:
    cpu_list = sorted(os.sched_getaffinity(0))
    if pin == "auto":
        pin = "split" if len(cpu_list) >= 2 else "none"
    trainer_cpus = {cpu_list[0]} if pin == "split" else None
    server_cpus = {cpu_list[1]} if pin == "split" else None
    schedule = [True] + abba(epochs)  # epoch 0: warm-up (first model calls, prompt encodings), dropped
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp_s:
        tmp = Path(tmp_s)
        prompts = tmp / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        cfg = tmp / "server.yaml"
        cfg.write_text(yaml.safe_dump(server_config(image_size)))
        server = ServerProcess(["--config", str(cfg)], log_level="WARNING")
        try:
            if server_cpus:
                pin_process(server.pid, server_cpus)
            spec = {
                "target": server.target,
                "http": server.http,
                "server_pid": server.pid,
                "sets": trainer_sets(prompts, batches),
                "out": str(tmp / "interleaved"),
                "schedule": schedule,
                "result": str(tmp / "interleaved.json"),
            }
            (tmp / "spec.json").write_text(json.dumps(spec))
            print(f"  interleaved: {len(schedule)} epochs in one trainer process ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "bench.trainer_overlap", "--worker", str(tmp / "spec.json")]
            wall, worker_rss, worker_cpu = run_child(cmd, tmp / "interleaved.log", trainer_cpus, 400)
            records = json.loads((tmp / "interleaved.json").read_text())
            measured = records[1:]

            separate = {}
            for i in range(sequential_runs):  # the literal method, as a cross-check
                for overlap in (True, False) if i % 2 == 0 else (False, True):
                    separate.setdefault("overlap" if overlap else "sequential", []).extend(
                        separate_run(server, tmp, prompts, batches, overlap, 6, trainer_cpus, i)
                    )

            # The RSS target: the tiny preset as shipped (discriminator updates, eval, checkpoint).
            from advgrpo.trainer.references import write_synthetic_references

            refs = write_synthetic_references(tmp / "refs", PROMPTS[:4], per_prompt=4)
            print("  tiny preset run (RSS) ...", file=sys.stderr, flush=True)
            tiny_cmd = [
                sys.executable, "-m", "advgrpo.trainer.train", "--preset", "tiny", "--server", server.target,
                "--output-dir", str(tmp / "tiny"), "--set", f"adversarial.references={refs}",
                "--set", "run.tensorboard=false",
            ]  # fmt: skip
            tiny_wall, tiny_rss, _ = run_child(tiny_cmd, tmp / "tiny.log", trainer_cpus, 300)
            server_peak_mib = round(proc_status_kib(server.pid, "VmHWM") / 1024, 1)
        finally:
            server.stop()
    on = summarise([r for r in measured if r["overlap"]])
    off = summarise([r for r in measured if not r["overlap"]])
    ratios = pair_ratios(measured)
    result = {
        "setup": {
            "trainer": "tiny preset, " + ", ".join(trainer_sets("<16 prompts>", batches)),
            "images_per_epoch": 8 * batches,
            "groups_per_epoch": 8 * batches // 4,
            "trainer_threads": "OMP_NUM_THREADS=1, torch.set_num_threads(1)",
            "server_config": server_config(image_size),
            "pinning": pin if pin == "none" else f"split: trainer on CPU {cpu_list[0]}, server on CPU {cpu_list[1]}",
            "method": f"one trainer process, reward.overlap alternated per epoch (ABBA), 1 warm-up epoch "
            f"(dropped) + {epochs} measured epochs per mode; one server",
            "schedule": ["overlap" if o else "sequential" for o in schedule],
        },
        "overlapped": on,
        "sequential": off,
        "speedup_median": round(off["median_epoch_s"] / on["median_epoch_s"], 3),
        "speedup_mean": round(off["mean_epoch_s"] / on["mean_epoch_s"], 3),
        "pair_ratios": ratios,
        "speedup_median_of_pairs": round(statistics.median(ratios), 3) if ratios else None,
        "quiet_pair_ratios": quiet_pairs(measured),
        "pipeline_bound_from_sequential_split": pipeline_bound(off, batches),
        # The same with the reward work the server really has in streamed mode (its model time):
        # no per-call overhead of ~52 small unary calls, bigger batches.
        "pipeline_bound_with_streamed_server_time": pipeline_bound(off, batches, on["server_model_s_per_epoch"]),
        "reward_share_sequential": round(off["median_reward_s"] / off["median_epoch_s"], 3),
        "train_share_sequential": round(off["median_train_s"] / off["median_epoch_s"], 3),
        # The sequential baseline sends one blocking Score per prompt group of a batch (~1.2 images
        # a call): what its reward time spends outside the model is per-call overhead.
        "sequential_reward_outside_model_s": round(off["median_reward_s"] - off["server_model_s_per_epoch"], 4),
        "overlapped_sample_slowdown": round(on["median_sample_s"] / off["median_sample_s"], 3),
        "interleaved_process": {
            "wall_s": round(wall, 1),
            "peak_rss_mib": round(worker_rss, 1),
            "cpu_s": round(worker_cpu, 1),
        },  # fmt: skip
        "tiny_preset_run": {
            "command": "python -m advgrpo.trainer.train --preset tiny --server <server> --output-dir <dir> "
            "--set adversarial.references=<synthetic, 4 prompts x 4> --set run.tensorboard=false",
            "wall_s": round(tiny_wall, 1),
            "peak_rss_mib": round(tiny_rss, 1),
        },
        "trainer_peak_rss_mib": round(max(tiny_rss, worker_rss), 1),
        "server_peak_rss_mib": server_peak_mib,
        "target_speedup": TARGET_SPEEDUP,
        "target_trainer_peak_rss_mib": TARGET_RSS_MIB,
        "epochs": records,
    }
    if separate:
        result["separate_runs"] = {
            mode: {
                "median_epoch_s": round(statistics.median(v["time_epoch_s"] for v in recs), 4),
                "epochs": recs,
            }
            for mode, recs in separate.items()
        }
        result["separate_runs"]["speedup_median"] = round(
            result["separate_runs"]["sequential"]["median_epoch_s"]
            / result["separate_runs"]["overlap"]["median_epoch_s"],
            3,
        )
    result["targets_met"] = {
        "overlap_speedup_1.3x": result["speedup_median"] >= TARGET_SPEEDUP,
        "tiny_trainer_peak_rss_below_3GiB": result["trainer_peak_rss_mib"] < TARGET_RSS_MIB,
    }
    return result


def separate_run(
    server: ServerProcess, tmp: Path, prompts: Path, batches: int, overlap: bool, epochs: int,
    cpus: set[int] | None, i: int,
) -> list[dict]:  # fmt: skip
    """``python -m advgrpo.trainer.train`` with one reward.overlap for the whole run; its measured epochs."""
    name = f"run{i}-{'overlap' if overlap else 'sequential'}"
    print(f"  {name} (python -m advgrpo.trainer.train) ...", file=sys.stderr, flush=True)
    out = tmp / name
    cmd = [sys.executable, "-m", "advgrpo.trainer.train", "--preset", "tiny", "--server", server.target,
           "--output-dir", str(out), "--epochs", str(epochs + 1), "--set", f"reward.overlap={str(overlap).lower()}"]  # fmt: skip
    for s in trainer_sets(prompts, batches):
        cmd += ["--set", s]
    run_child(cmd, tmp / f"{name}.log", cpus, 300)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: round(r[k], 4) for k in TIME_KEYS} for r in recs if "time_epoch_s" in r][1:]


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _quiet_text(q: dict | None) -> str:
    if not q:
        return ""
    return f"busy CPU at start {q['busy_cores_at_start']:.2f} cores (after {q['waited_s']:.0f} s of waiting); "


def table(results: dict) -> str:
    m = results["machine"]
    t = results["trainer"]
    on, off, b = t["overlapped"], t["sequential"], t["pipeline_bound_from_sequential_split"]
    s = t["setup"]

    def epoch(x: dict) -> str:
        return f"{x['median_epoch_s']:.2f} s ({x['p25_epoch_s']:.2f}-{x['p75_epoch_s']:.2f})"

    def split(x: dict) -> str:
        return (
            f"sample / reward / train {x['median_sample_s']:.2f} / {x['median_reward_s']:.2f} / "
            f"{x['median_train_s']:.2f} s; server {x['server_ms_per_image']:.1f} ms/img, "
            f"{x['server_images_per_call']:.1f} img/call"
        )

    q = t["quiet_pair_ratios"]
    quiet = (
        f"{statistics.median(q):.2f}x over the {len(q)} pairs with < 0.1 core of other processes' CPU"
        if q
        else "no pair free of other processes' CPU"
    )
    rows = [
        ("Epoch, sequential (`reward.overlap=false`), median (p25-p75)", epoch(off), split(off), "", ""),
        ("Epoch, overlapped (`reward.overlap=true`), median (p25-p75)", epoch(on), split(on), "", ""),
        (
            "Overlap speedup (median sequential / median overlapped)",
            f"{t['speedup_median']:.2f}x",
            f"median of adjacent-pair ratios {t['speedup_median_of_pairs']:.2f}x ({quiet}); perfect-pipeline bound from "
            f"the sequential split {b['speedup']:.2f}x, with the streamed server time "
            f"{t['pipeline_bound_with_streamed_server_time']['speedup']:.2f}x (GRPO step = "
            f"{t['train_share_sequential']:.0%} of the sequential epoch)",
            f">= {t['target_speedup']}x",
            _met(t["targets_met"]["overlap_speedup_1.3x"]),
        ),
    ]
    if "separate_runs" in t:
        sr = t["separate_runs"]
        rows.append(
            (
                "Cross-check: separate `python -m advgrpo.trainer.train` runs per mode",
                f"{sr['speedup_median']:.2f}x",
                f"{sr['sequential']['median_epoch_s']:.2f} s vs {sr['overlap']['median_epoch_s']:.2f} s",
                "",
                "",
            )
        )
    rows += [
        (
            "Peak RSS, trainer process (tiny preset run)",
            f"{t['tiny_preset_run']['peak_rss_mib']:.0f} MiB",
            f"ru_maxrss (wait4); the 64-image/epoch bench process: {t['interleaved_process']['peak_rss_mib']:.0f} MiB",
            f"< {t['target_trainer_peak_rss_mib'] // 1024} GiB",
            _met(t["targets_met"]["tiny_trainer_peak_rss_below_3GiB"]),
        ),
        ("Peak RSS, reward server process", f"{t['server_peak_rss_mib']:.0f} MiB", "VmHWM, after all runs", "", ""),
    ]
    lines = [
        f"Machine: {m['cpu_model']} ({m.get('cpu_id', '')}), {m['cpu_cores']} cores, {m['memory_gib']} GiB, "
        f"GPU: {m['gpu']}; Python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}; {m['date']}; "
        f"load average before/after: {m.get('loadavg_1m_before', 0):.2f}/{m.get('loadavg_1m_after', 0):.2f}; "
        f"{_quiet_text(m.get('quiet_wait'))}"
        f"other processes' CPU during the epochs (median): {on['median_foreign_cpu_cores']:.2f} / "
        f"{off['median_foreign_cpu_cores']:.2f} cores (overlapped / sequential)",
        f"Setup: tiny preset, {s['images_per_epoch']} images ({s['groups_per_epoch']} groups of 4) per epoch in "
        f"{s['images_per_epoch'] // 8} sampling batches, discriminator off; reward = tiny DINOv2 at "
        f"{s['server_config']['models']['dino']['params']['image_size']} px; one torch thread each; "
        f"pinning: {s['pinning']}; {s['method']}.",
        "",
        "| Benchmark | Result | Detail | Target | Met |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="measured epochs per mode (after one warm-up epoch)")
    p.add_argument("--batches", type=int, default=8, help="sampling.batches_per_epoch (8 images each)")
    p.add_argument("--image-size", type=int, default=336, help="the server's DINO input side (reward cost)")
    p.add_argument(
        "--pin",
        choices=("auto", "split", "none"),
        default="auto",
        help="split: trainer on one CPU, server on another (auto: split when >= 2 CPUs)",
    )
    p.add_argument(
        "--sequential-runs",
        type=int,
        default=0,
        help="also N pairs of separate `python -m advgrpo.trainer.train` runs per mode (cross-check, ~50 s a pair)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="wait up to this many seconds for an idle machine before starting (0: do not wait)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: the trainer subprocess
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    t0 = time.monotonic()
    results: dict = {"machine": machine_info()}
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    results["machine"]["quiet_wait"] = quiet
    results["machine"]["loadavg_1m_before"] = os.getloadavg()[0]
    if quiet is not None and not quiet["quiet"]:
        print(
            f"warning: {quiet['busy_cores_at_start']:.2f} cores busy with other work after waiting "
            f"{quiet['waited_s']:.0f} s; it will skew the figures",
            file=sys.stderr,
        )
    print("trainer overlap ...", file=sys.stderr, flush=True)
    results["trainer"] = run(args.epochs, args.batches, args.image_size, args.pin, args.sequential_runs)
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    results["targets_met"] = results["trainer"]["targets_met"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
