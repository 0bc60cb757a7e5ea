"""Issue 15, faults at trainer level: the trainer survives a SIGKILL and restart of its reward
server mid-run with no group lost or counted twice, and after a SIGKILL of the trainer itself
``--resume`` continues from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advgrpo.client import RewardClient
from advgrpo.common.process import ServerProcess

from .conftest import REPO
from .trainer_helpers import free_port, make_reference_set, read_metrics

pytestmark = pytest.mark.slow


def trainer(server: str, refs: Path, out: Path, epochs: int, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "advgrpo.trainer.train", "--preset", "tiny", "--server", server,
        "--output-dir", str(out), "--epochs", str(epochs), "--set", f"adversarial.references={refs}",
        "--set", "run.tensorboard=false", "--set", "reward.shared_memory=false", *extra,
    ]  # fmt: skip
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def epochs_done(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [m["epoch"] for m in read_metrics(out) if "reward_mean" in m]


def test_the_trainer_survives_a_reward_server_killed_and_restarted_mid_run(tmp_path):
    refs = make_reference_set(tmp_path / "refs")
    port, state = free_port(), tmp_path / "state"
    args = ["--preset", "tiny", "--state-dir", str(state), "--port", str(port)]
    out = tmp_path / "run"
    server = ServerProcess(args, http=False)
    try:
        run = trainer(f"127.0.0.1:{port}", refs, out, 6)
        wait_for(lambda: len(epochs_done(out)) >= 1, 240, "the first epoch")
        time.sleep(0.3)  # into the next epoch's sampling and scoring
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(30)
        time.sleep(1.0)  # the trainer's calls now fail with UNAVAILABLE and retry
        server = ServerProcess(args, http=False)  # same port, same state
        assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-4000:]
        with RewardClient(server.target) as client:
            final_version = {m.name: m.version for m in client.list_models()}["dino"]
    finally:
        server.stop()
    assert epochs_done(out) == list(range(6))
    assert "UNAVAILABLE" in (tmp_path / "run.log").read_text()  # it did meet the dead server, and waited
    # Every epoch's groups were scored exactly once: none lost, none counted twice.
    groups: dict[int, list[str]] = {}
    for line in (out / "rewards-rank0.jsonl").read_text().splitlines():
        record = json.loads(line)
        groups.setdefault(record["epoch"], []).append(record["group_id"])
    assert sorted(groups) == list(range(6))
    for epoch, ids in groups.items():
        assert len(ids) == len(set(ids)) == 2, (epoch, ids)  # the tiny preset: 8 images in groups of 4
    # Each discriminator epoch's update was applied once: versions 1, 2, ... and the server ends there.
    updates = [m["d_version"] for m in read_metrics(out) if "d_version" in m]
    assert updates and updates == list(range(1, len(updates) + 1)) and final_version == len(updates)


def test_after_a_sigkill_of_the_trainer_resume_continues_from_the_last_checkpoint(tmp_path):
    refs = make_reference_set(tmp_path / "refs")
    out = tmp_path / "run"
    with ServerProcess(["--preset", "tiny", "--state-dir", str(tmp_path / "state")], http=False) as server:
        run = trainer(server.target, refs, out, 6, "--set", "run.save_every=1")
        checkpoints = out / "checkpoints"
        wait_for(lambda: len([p for p in checkpoints.glob("epoch-*") if (p / "state.json").exists()]) >= 2
                 if checkpoints.is_dir() else False, 300, "two checkpoints")  # fmt: skip
        os.kill(run.pid, signal.SIGKILL)
        run.wait(30)
        done = sorted(p.name for p in checkpoints.iterdir() if (p / "state.json").exists())
        last = json.loads((checkpoints / done[-1] / "state.json").read_text())
        resumed = trainer(server.target, refs, out, 6, "--set", "run.save_every=1", "--resume")
        assert resumed.wait(600) == 0, (tmp_path / "run.log").read_text()[-4000:]
    log = (tmp_path / "run.log").read_text()
    assert f"resumed from {checkpoints / done[-1]} at epoch {last['epoch']}" in log, log[-3000:]
    final = sorted(p.name for p in checkpoints.iterdir() if (p / "state.json").exists())
    assert json.loads((checkpoints / final[-1] / "state.json").read_text())["epoch"] == 6
    # The resumed run started where the checkpoint left off: its epochs are last["epoch"]..5.
    records = [m["epoch"] for m in read_metrics(out) if "reward_mean" in m]
    assert records[-(6 - last["epoch"]) :] == list(range(last["epoch"], 6))
    assert not list(checkpoints.glob("*.tmp"))
