"""Reliability runs of issue 15: load, SIGKILLs, fuzz. ``python -m bench.reliability`` (``make
reliability``) runs them at full length, writes ``bench/results/reliability.json`` and
regenerates ``docs/RELIABILITY.md``; ``--quick`` runs short versions (what ``make test`` runs).

* **load**: ``--clients`` (32) threads on loopback for ``--seconds`` (60), each its own channel,
  mixing unary ``Score`` (groups of 4 new 64x64 images), ``ScoreStream`` (3 such groups) and
  ``UpdateDiscriminator`` (dino, 4 + 4 images, 1 step) about 6 : 3 : 1, on the tiny preset with a
  state dir, after a warm-up of ``--warmup`` seconds (the feature caches fill to their bound
  there). Raw stubs, no client retries, so every status the server sends is seen. Checked: no
  status but OK or a transient RESOURCE_EXHAUSTED (one with a retry hint); the server's RSS,
  sampled each second, grows less than 10 % from the first 10 s to the last 10 s; the final
  discriminator version is the initial one plus the acknowledged updates. Reported: p50 and p99
  latency per RPC.
* **kill**: one client sends discriminator updates back to back while the server is SIGKILLed at
  a random moment (0.3 to 2.5 s after its start) ``--kills`` times (20). After each restart: the
  version is the last acknowledged one (an update the server made durable but could not answer
  is sent again with its id, and replayed, never applied twice), the state file's checksum is the
  one read after that acknowledgement (the weights, byte for byte), and a fixed probe scores
  exactly as it did then.
* **fuzz**: ``bench.fuzz`` (bounded, seeded): every input gets a status, the server lives, the
  scores of well-formed requests are unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np

from advgrpo.common.process import ServerProcess
from advgrpo.common.protocol import RETRY_PUSHBACK_KEY
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

from .common import machine_info, proc_status_kib

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "reliability.json"
DOC = REPO / "docs" / "RELIABILITY.md"
RSS_GROWTH_LIMIT = 0.10
# The kill loop's server: the tiny preset's discriminator alone (restarts in seconds).
DINO_ONLY = "models:\n  pickscore: null\n  ocr: null\n  dino_similarity: null\n"


def raw_image(rng: np.random.Generator, side: int = 64) -> reward_pb2.Image:
    data = rng.integers(0, 256, (side, side, 3), dtype=np.uint8).tobytes()
    return reward_pb2.Image(encoding=reward_pb2.ENCODING_RAW_RGB8, height=side, width=side, data=data)


def group(rng: np.random.Generator, n: int = 4, prompt: str = "a red circle") -> reward_pb2.ImageGroup:
    return reward_pb2.ImageGroup(prompt=prompt, images=[raw_image(rng) for _ in range(n)])


def update_request(rng: np.random.Generator, update_id: str | None = None) -> reward_pb2.UpdateDiscriminatorRequest:
    return reward_pb2.UpdateDiscriminatorRequest(
        model="dino", references=[group(rng)], generated=[group(rng)], steps=1, update_id=update_id or uuid.uuid4().hex
    )


def transient(exc: grpc.RpcError) -> bool:
    """A RESOURCE_EXHAUSTED that says when to come back (gRFC A6 pushback >= 0)."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    pushback = dict(exc.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY, "-1")
    return pushback.lstrip("-").isdigit() and int(pushback) >= 0


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    a = np.asarray(seconds) * 1000
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}  # fmt: skip


# ------------------------------------------------------------------------------------------ load


def run_load(clients: int, seconds: float, warmup: float, seed: int = 0) -> dict:
    state = Path(tempfile.mkdtemp(prefix="advgrpo-load-"))
    with ServerProcess(["--preset", "tiny", "--state-dir", str(state)], http=False, log_level="WARNING") as server:
        with grpc.insecure_channel(server.target) as channel:
            versions = {m.name: m.version for m in reward_pb2_grpc.RewardServiceStub(channel).ListModels(
                reward_pb2.ListModelsRequest(), timeout=30).models}  # fmt: skip
        initial = versions["dino"]
        stop = threading.Event()
        measuring = threading.Event()
        lock = threading.Lock()
        latencies: dict[str, list[float]] = {"Score": [], "ScoreStream": [], "UpdateDiscriminator": []}
        statuses: dict[str, dict[str, int]] = {k: {} for k in latencies}
        unexpected: list[str] = []
        acknowledged = 0
        last_answer = [0.0] * clients  # monotonic time of each client's last answered call
        rss: list[tuple[float, float]] = []

        def note(rpc: str, status: str, elapsed: float | None) -> None:
            with lock:
                statuses[rpc][status] = statuses[rpc].get(status, 0) + 1
                if elapsed is not None and measuring.is_set():
                    latencies[rpc].append(elapsed)

        def client(index: int) -> None:
            nonlocal acknowledged
            rng = np.random.default_rng(seed * 1000 + index)
            pick = random.Random(seed * 1000 + index)
            with grpc.insecure_channel(server.target) as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                while not stop.is_set():
                    roll = pick.random()
                    rpc = "Score" if roll < 0.6 else "ScoreStream" if roll < 0.9 else "UpdateDiscriminator"
                    t0 = time.perf_counter()
                    try:
                        if rpc == "Score":
                            stub.Score(reward_pb2.ScoreRequest(groups=[group(rng)]), timeout=60)
                        elif rpc == "ScoreStream":
                            requests = [reward_pb2.ScoreRequest(groups=[group(rng)]) for _ in range(3)]
                            assert len(list(stub.ScoreStream(iter(requests), timeout=60))) == 3
                        else:
                            answer = stub.UpdateDiscriminator(update_request(rng), timeout=120)
                            with lock:
                                acknowledged += 0 if answer.replayed else 1
                        note(rpc, "OK", time.perf_counter() - t0)
                        last_answer[index] = time.monotonic()
                    except grpc.RpcError as exc:
                        name = exc.code().name + ("" if not transient(exc) else " (transient)")
                        note(rpc, name, None)
                        if not transient(exc):
                            with lock:
                                unexpected.append(f"{rpc}: {exc.code().name}: {exc.details()}")
                        time.sleep(0.05)
                    except Exception as exc:  # a wrong answer (e.g. a stream short of replies): counted
                        note(rpc, type(exc).__name__, None)
                        with lock:
                            unexpected.append(f"{rpc}: {type(exc).__name__}: {exc}")

        def sample_rss() -> None:
            t_start = None
            while not stop.is_set():
                if measuring.is_set():
                    t_start = t_start or time.monotonic()
                    rss.append((time.monotonic() - t_start, proc_status_kib(server.pid, "VmRSS") / 1024))
                time.sleep(1.0)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        sampler = threading.Thread(target=sample_rss, daemon=True)
        for t in [*threads, sampler]:
            t.start()
        time.sleep(warmup)  # the warm-up's answers count toward statuses, not latencies
        measuring.set()
        time.sleep(seconds)
        ended = time.monotonic()
        stop.set()
        for t in threads:
            t.join(180)
        sampler.join(5)
        alive = server.proc.poll() is None
        with grpc.insecure_channel(server.target) as channel:
            final = {m.name: m.version for m in reward_pb2_grpc.RewardServiceStub(channel).ListModels(
                reward_pb2.ListModelsRequest(), timeout=30).models}["dino"]  # fmt: skip
        peak = proc_status_kib(server.pid, "VmHWM") / 1024
    # Every client kept working to the end: an answer in the last 10 s of the window.
    idle_clients = sum(1 for t in last_answer if t < ended - 10)
    first = [m for t, m in rss if t < 10]
    last = [m for t, m in rss if t >= seconds - 10]
    growth = (statistics.mean(last) - statistics.mean(first)) / statistics.mean(first) if first and last else None
    return {
        "clients": clients,
        "seconds": seconds,
        "warmup_s": warmup,
        "mix": "Score 60 %, ScoreStream (3 groups) 30 %, UpdateDiscriminator (dino, 1 step) 10 %; groups of 4 new 64x64 images",
        "latency": {rpc: percentiles(v) for rpc, v in latencies.items()},
        "statuses": statuses,
        "unexpected_statuses": unexpected[:20],
        "unexpected_count": len(unexpected),
        "rss_mib_first_10s": round(statistics.mean(first), 1) if first else None,
        "rss_mib_last_10s": round(statistics.mean(last), 1) if last else None,
        "rss_growth": round(growth, 4) if growth is not None else None,
        "server_peak_rss_mib": round(peak, 1),
        "initial_version": initial,
        "acknowledged_updates": acknowledged,
        "final_version": final,
        "server_alive": alive,
        "clients_idle_in_last_10s": idle_clients,
        "ok": bool(
            alive
            and not unexpected
            and not idle_clients
            and growth is not None
            and growth < RSS_GROWTH_LIMIT
            and final == initial + acknowledged
        ),  # fmt: skip
    }


# ------------------------------------------------------------------------------------------ kill


def _models(stub) -> dict[str, int]:
    return {m.name: m.version for m in stub.ListModels(reward_pb2.ListModelsRequest(), timeout=30).models}


def run_kills(kills: int, seed: int = 0) -> dict:
    from advgrpo.reward_server.state import CHECKSUM_KEY, StateStore

    root = Path(tempfile.mkdtemp(prefix="advgrpo-kill-"))
    state_dir, config = root / "state", root / "dino.yaml"
    config.write_text(DINO_ONLY)
    args = ["--preset", "tiny", "--config", str(config), "--state-dir", str(state_dir)]
    pick = random.Random(seed)
    rng = np.random.default_rng(seed)
    probe = reward_pb2.ScoreRequest(groups=[group(np.random.default_rng(12345))], weights={"dino": 1.0})
    # What the client knows at its last acknowledgement: version, state checksum, probe scores
    # (None when the kill interrupted the probe call itself).
    acked = {"version": 0, "checksum": None, "probe": None}
    pending: reward_pb2.UpdateDiscriminatorRequest | None = None
    cycles, replays, acknowledged = [], 0, 0

    def checksum() -> str | None:
        path = state_dir / "dino.safetensors"
        return StateStore.read_verified(path)[1][CHECKSUM_KEY] if path.exists() else None

    def acknowledge(stub, version: int) -> None:
        acked.update(version=version, checksum=checksum(), probe=None)
        acked["probe"] = list(stub.Score(probe, timeout=60).groups[0].rewards)

    for cycle in range(kills + 1):
        server = ServerProcess(args, http=False, log_level="WARNING")
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                found = _models(stub)["dino"]
                check = {"cycle": cycle, "version_found": found, "last_acknowledged": acked["version"]}
                # The last acknowledged version, or one more when the update in flight at the kill
                # had been made durable but not answered: never anything else.
                allowed = {acked["version"], acked["version"] + 1} if pending is not None else {acked["version"]}
                check["version_ok"] = found in allowed
                if found == acked["version"] and acked["checksum"] is not None:
                    check["weights_identical"] = checksum() == acked["checksum"]
                    if acked["probe"] is not None:
                        check["scores_identical"] = (
                            list(stub.Score(probe, timeout=60).groups[0].rewards) == acked["probe"]
                        )
                if pending is not None:  # sent again with its id: applied once, whatever happened
                    answer = stub.UpdateDiscriminator(pending, timeout=120)
                    check["in_flight_update"] = "replayed" if answer.replayed else "applied"
                    check["exactly_once"] = answer.version == acked["version"] + 1 and answer.replayed == (
                        found == acked["version"] + 1
                    )
                    replays += int(answer.replayed)
                    acknowledged += 1
                    pending = None
                    acknowledge(stub, answer.version)
                cycles.append(check)
                if cycle == kills:
                    break
                killer = threading.Timer(pick.uniform(0.3, 2.5), os.kill, (server.pid, signal.SIGKILL))
                killer.start()
                try:
                    while True:
                        pending = update_request(rng)
                        answer = stub.UpdateDiscriminator(pending, timeout=120)
                        pending = None
                        acknowledged += 1
                        acknowledge(stub, answer.version)
                except grpc.RpcError as exc:  # the kill, and nothing else
                    killer.join()
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        raise RuntimeError(
                            f"cycle {cycle}: a call failed before the kill: {exc.code().name}: {exc.details()}"
                        ) from exc
                killer.join()
                if server.proc.wait(30) != -signal.SIGKILL:
                    raise RuntimeError(f"cycle {cycle}: the server ended with {server.proc.returncode}, not by SIGKILL")
        finally:
            server.kill()
    checks = {
        "version_ok": [c["version_ok"] for c in cycles[1:]],
        "weights_identical": [c["weights_identical"] for c in cycles if "weights_identical" in c],
        "scores_identical": [c["scores_identical"] for c in cycles if "scores_identical" in c],
        "exactly_once": [c["exactly_once"] for c in cycles if "exactly_once" in c],
    }
    return {
        "kills": kills,
        "restarts_checked": len(cycles) - 1,
        "acknowledged_updates": acknowledged,
        "in_flight_updates_resent": len(checks["exactly_once"]),
        "in_flight_updates_replayed": replays,
        "final_version": acked["version"],
        "checks": {k: f"{sum(v)}/{len(v)}" for k, v in checks.items()},
        "all_versions_match": all(checks["version_ok"]),
        "all_weights_byte_identical": all(checks["weights_identical"]),
        "all_scores_identical": all(checks["scores_identical"]),
        "all_exactly_once": all(checks["exactly_once"]),
        "cycles": cycles,
        # Every restart compared the version, and the weights (unless an update durable but
        # unanswered had moved it on); the probe's scores wherever the kill missed the probe call.
        "ok": len(checks["version_ok"]) == kills
        and len(checks["weights_identical"])
        + sum(1 for c in cycles[1:] if c["version_found"] != c["last_acknowledged"])
        == kills
        and all(all(v) for v in checks.values())
        and acked["version"] == acknowledged,
    }


# ------------------------------------------------------------------------------------------ main


def run(quick: bool, clients: int, seconds: float, warmup: float, kills: int, fuzz_inputs: int, seed: int) -> dict:
    from . import fuzz

    started = time.perf_counter()
    result = {"machine": machine_info(), "quick": quick}
    print(f"load: {clients} clients, {warmup:g} s warm-up + {seconds:g} s ...", file=sys.stderr, flush=True)
    result["load"] = run_load(clients, seconds, warmup, seed)
    print(f"kill: {kills} SIGKILLs ...", file=sys.stderr, flush=True)
    result["kill"] = run_kills(kills, seed)
    print(f"fuzz: {fuzz_inputs} inputs ...", file=sys.stderr, flush=True)
    result["fuzz"] = fuzz.run(inputs=fuzz_inputs, seed=seed)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["ok"] = bool(result["load"]["ok"] and result["kill"]["ok"] and result["fuzz"]["requirements_met"])
    return result


def report(result: dict) -> str:
    m, load, kill, fz = result["machine"], result["load"], result["kill"], result["fuzz"]
    lines = [
        "# Reliability",
        "",
        "Generated by `make reliability` (`python -m bench.reliability`) from `bench/results/reliability.json`;",
        "do not edit by hand. `make test` runs short versions of each run (`tests/test_reliability.py`,",
        "`tests/test_fuzz.py`), and the tests of issue 15 show each behaviour on its own (security:",
        "`tests/test_security.py`; fail-closed: `tests/test_fail_closed.py`; limits: `tests/test_server_limits.py`;",
        "state: `tests/test_state_integrity.py`).",
        "",
        f"Machine: {m['cpu_model']} ({m['cpu_id']}), {m['cpu_cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']};",
        f"Python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}; {m['date']}. Total wall time {result['wall_s']} s.",
        "",
        "| Run | Result | Held |",
        "| --- | --- | --- |",
        f"| Load: {load['clients']} clients, {load['seconds']:g} s (after {load['warmup_s']:g} s warm-up), tiny preset | "
        f"{sum(sum(v.values()) for v in load['statuses'].values())} RPCs (warm-up included); statuses "
        f"{_statuses(load['statuses'])}; "
        f"{load['unexpected_count']} unexpected | {_yes(load['unexpected_count'] == 0)} |",
        f"| Load: server RSS, first vs last 10 s | {load['rss_mib_first_10s']} -> {load['rss_mib_last_10s']} MiB "
        f"({_pct(load['rss_growth'])}; peak {load['server_peak_rss_mib']} MiB) | {_yes(load['rss_growth'] is not None and load['rss_growth'] < RSS_GROWTH_LIMIT)} (< 10 %) |",
        f"| Load: updates accounted for | {load['acknowledged_updates']} acknowledged, version "
        f"{load['initial_version']} -> {load['final_version']} | {_yes(load['final_version'] == load['initial_version'] + load['acknowledged_updates'])} |",
        f"| SIGKILL during a stream of updates | {kill['kills']} kills; {kill['acknowledged_updates']} updates "
        f"acknowledged, final version {kill['final_version']}; {kill['in_flight_updates_resent']} updates in flight at a kill "
        f"sent again, {kill['in_flight_updates_replayed']} of them replayed (durable but unanswered) | version after "
        f"restart {kill['checks']['version_ok']}, weights byte-identical {kill['checks']['weights_identical']}, scores "
        f"identical {kill['checks']['scores_identical']}, in-flight updates exactly once {kill['checks']['exactly_once']} |",
        f"| Fuzz (raw bytes, image payloads, random protobuf; `bench.fuzz`, seed {fz['seed']}) | {fz['inputs_tried']} "
        f"inputs; statuses {_statuses(fz['status_codes'])}; {fz['violations_total']} violations | every input answered "
        f"in time {_yes(fz['checks']['every_input_answered_in_time'])}, server alive {_yes(fz['checks']['server_alive'])}, "
        f"scores of well-formed requests unchanged {_yes(fz['checks']['well_formed_scores_unchanged'])} |",
        "",
        "Latency under load (measured window only, answered calls):",
        "",
        "| RPC | calls | p50 | p99 | max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rpc, p in load["latency"].items():
        if p.get("n"):
            lines.append(f"| {rpc} | {p['n']} | {p['p50_ms']} ms | {p['p99_ms']} ms | {p['max_ms']} ms |")
    lines += [
        "",
        "Nothing acknowledged was lost: " + _yes(result["ok"]) + ".",
        "",
        "Notes:",
        "",
        f"- {load['clients']} clients share the server's {m['cpu_cores']} cores with the clients' own process: latency is",
        f"  mostly queueing; {_transient(load['statuses'])} calls were refused transiently (a bounded queue full).",
        "- An update in flight at a kill is sent again with its id. Where the server had made it durable",
        "  before it died, the resend is replayed, not applied again: a kill must land between the state",
        "  write and the answer for that, a window of about a millisecond, and the run reports how often",
        "  it happened; `tests/test_state_integrity.py` forces that case with one kill.",
        "",
    ]
    return "\n".join(lines)


def _statuses(counts: dict) -> str:
    total: dict[str, int] = {}
    for v in counts.values():
        if isinstance(v, dict):
            for k, n in v.items():
                total[k] = total.get(k, 0) + n
        else:
            return ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    return ", ".join(f"{k} {n}" for k, n in sorted(total.items()))


def _transient(statuses: dict) -> int:
    return sum(n for per in statuses.values() for k, n in per.items() if k.endswith("(transient)"))


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} %"


def _yes(ok) -> str:
    return "yes" if ok else "**no**"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short versions: 8 clients x 20 s, 3 kills, 200 fuzz inputs")
    p.add_argument("--clients", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--warmup", type=float)
    p.add_argument("--kills", type=int)
    p.add_argument("--fuzz-inputs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--doc", type=Path, help=f"write the report here (default: {DOC.relative_to(REPO)} unless --quick)")
    a = p.parse_args(argv)
    q = a.quick
    result = run(
        quick=q,
        clients=a.clients or (8 if q else 32),
        seconds=a.seconds or (20.0 if q else 60.0),
        warmup=a.warmup if a.warmup is not None else (3.0 if q else 15.0),
        kills=a.kills if a.kills is not None else (3 if q else 20),
        fuzz_inputs=a.fuzz_inputs or (200 if q else 2000),
        seed=a.seed,
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    doc = a.doc or (None if q else DOC)
    if doc is not None:
        doc.write_text(text)
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
