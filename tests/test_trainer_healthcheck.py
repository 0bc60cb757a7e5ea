"""The trainer's heartbeat and the check the trainer image's HEALTHCHECK runs: each way it can fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from advgrpo.trainer import healthcheck
from advgrpo.trainer.healthcheck import Heartbeat, check

from .conftest import REPO


def write(path, **fields):
    now = time.time()
    beat = {"pid": os.getpid(), "status": "running", "phase": "sampling", "time": now, "progress_time": now}
    path.write_text(json.dumps({**beat, **fields}))
    return path


def test_a_running_trainers_heartbeat_is_kept_fresh_and_records_progress(tmp_path):
    beat = Heartbeat(tmp_path / "hb" / "heartbeat.json", interval_s=0.05).start()
    try:
        first = json.loads(beat.path.read_text())
        assert first["phase"] == "starting" and first["pid"] == os.getpid()
        beat.progress("sampling", epoch=3, batch=1)
        time.sleep(0.3)
        now = json.loads(beat.path.read_text())
        assert now["time"] > first["time"] and now["epoch"] == 3 and now["phase"] == "sampling"
        ok, message = check(beat.path, max_age_s=5)
        assert ok and "epoch 3" in message, message
    finally:
        beat.stop("finished")
    ok, message = check(beat.path)
    assert not ok and "trainer finished" in message
    assert not list(beat.path.parent.glob(".*.tmp")), "temporary files left behind"


def test_each_unhealthy_state_is_reported(tmp_path):
    hb = tmp_path / "heartbeat.json"
    ok, msg = check(hb)
    assert not ok and "no heartbeat" in msg
    hb.write_text("{not json")
    assert not check(hb)[0] and "unreadable" in check(hb)[1]
    assert check(write(hb))[0]
    assert "old" in check(write(hb, time=time.time() - 120), max_age_s=30)[1]
    ok, msg = check(write(hb, progress_time=time.time() - 100), max_stall_s=60)
    assert not ok and "no progress for" in msg
    # Starting (loading the model, connecting) has its own, longer, limit.
    assert check(write(hb, phase="starting", progress_time=time.time() - 100), max_stall_s=60, max_start_s=600)[0]
    assert not check(write(hb, phase="starting", progress_time=time.time() - 700), max_start_s=600)[0]
    failed = write(hb, status="failed", error="ConfigError: reward.server unreachable")
    assert "failed" in check(failed)[1] and "unreachable" in check(failed)[1]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ok, msg = check(write(hb, pid=int(gone.stdout)))
    assert not ok and "is gone" in msg


def test_the_command_line_reads_the_environment_and_exits_1_when_unhealthy(tmp_path):
    hb = write(tmp_path / "heartbeat.json")
    env = {**os.environ, healthcheck.ENV_FILE: str(hb)}
    cmd = [sys.executable, "-m", "advgrpo.trainer.healthcheck"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("healthy:"), out
    write(hb, progress_time=time.time() - 50)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**env, healthcheck.ENV_MAX_STALL: "40"})
    assert out.returncode == 1 and "no progress" in out.stdout, out
    del env[healthcheck.ENV_FILE]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "not set" in out.stdout


def test_a_run_reports_how_it_ended(tmp_path, monkeypatch):
    """``reporting`` around a run: finished, failed with the error, interrupted, or what the run said."""

    def ended(body) -> dict:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        monkeypatch.setenv(healthcheck.ENV_FILE, str(path))
        try:
            with healthcheck.reporting() as run:
                body(run)
        except (RuntimeError, KeyboardInterrupt):
            pass
        return json.loads(path.read_text())

    assert ended(lambda run: None)["status"] == "finished"

    def boom(run):
        raise RuntimeError("no reward server")

    failed = ended(boom)
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: no reward server"

    def ctrl_c(run):
        raise KeyboardInterrupt

    assert ended(ctrl_c)["status"] == "interrupted"
    said = ended(lambda run: run.fail("exit code 2"))
    assert said["status"] == "failed" and said["error"] == "exit code 2"
    with pytest.raises(RuntimeError):  # the error still reaches the caller
        with healthcheck.reporting():
            raise RuntimeError("x")


def test_an_unwritable_heartbeat_never_stops_the_run(tmp_path, monkeypatch, caplog):
    """A read-only or full disk: the run goes on without a heartbeat (the check then says "no
    heartbeat"), and its end is still reported to the caller as it happened."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(healthcheck.ENV_FILE, str(blocker / "heartbeat.json"))  # its parent is a file
    ran = []
    with caplog.at_level("WARNING", logger=healthcheck.__name__):
        with healthcheck.reporting():
            ran.append(True)
    assert ran == [True] and "no heartbeat" in caplog.text
    ok, message = check(blocker / "heartbeat.json")
    assert not ok, message

    path = tmp_path / "ok" / "heartbeat.json"
    monkeypatch.setenv(healthcheck.ENV_FILE, str(path))
    with pytest.raises(RuntimeError, match="the real error"):
        with healthcheck.reporting():
            shutil.rmtree(path.parent)  # the end cannot be written (its folder is now a file) ...
            path.parent.write_text("")
            raise RuntimeError("the real error")  # ... and the run's own error still surfaces
    assert healthcheck._current is None and "could not record" in caplog.text
