"""`make demo` as a user sees it: the main job on the embedded default, its own reward server,
progress and results on the terminal, and none of the libraries' noise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

# Messages a user once saw on every epoch (or every run) that said nothing about their run.
NOISE = [
    "was truncated because",  # diffusers' SD3 pipeline, per prompt encoded past max_sequence_length
    "requires torchvision",  # transformers' image-processor fallback
    "it/s]",  # diffusers' per-step progress bar of the eval images
    "Traceback",
]


def test_the_demo_trains_against_its_own_server_and_prints_only_its_own_progress(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "advgrpo.trainer.demo", "--epochs", "4", "--output-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    shown = out.stdout + out.stderr
    assert [n for n in NOISE if n in shown] == [], shown[-3000:]
    assert "done in" in out.stdout and "4 epochs, 2 discriminator updates" in out.stdout, out.stdout
    assert "adv-grpo" in out.stderr  # the epoch bar is the progress a user watches
    records = [json.loads(line) for line in (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["epoch"] for r in records if "reward_mean" in r) == [0, 1, 2, 3]
    assert (tmp_path / "demo" / "reward-server.log").stat().st_size > 0
