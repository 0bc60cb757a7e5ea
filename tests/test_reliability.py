"""Issue 15: the short versions of the reliability runs (bench/reliability.py; `make reliability`
runs them at full length into docs/RELIABILITY.md): load, SIGKILLs during updates, fuzz."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO
from .test_fuzz import check_campaign

pytestmark = pytest.mark.slow


def test_the_short_reliability_runs_hold(tmp_path):
    out, doc = tmp_path / "reliability.json", tmp_path / "RELIABILITY.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.reliability", "--quick", "--out", str(out), "--doc", str(doc)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    load, kill = r["load"], r["kill"]
    # Load: only OK or transient refusals, memory flat, every acknowledged update counted.
    assert load["unexpected_count"] == 0 and load["server_alive"] and load["clients_idle_in_last_10s"] == 0
    assert sum(load["statuses"]["UpdateDiscriminator"].values()) > 0 and load["latency"]["ScoreStream"]["n"] > 0
    assert load["rss_growth"] < 0.10
    assert load["final_version"] == load["initial_version"] + load["acknowledged_updates"] > 0
    # Kills: after each restart, the acknowledged version, weights and scores.
    assert kill["restarts_checked"] == kill["kills"] == 3
    assert (
        kill["ok"]
        and kill["all_versions_match"]
        and kill["all_weights_byte_identical"]
        and kill["all_scores_identical"]
    )
    assert kill["checks"]["version_ok"] == "3/3"
    assert kill["final_version"] == kill["acknowledged_updates"] > 0
    # Fuzz: every input answered with a deliberate status, the server alive, scores unchanged.
    check_campaign(r["fuzz"])
    # The report names the machine and every run.
    text = doc.read_text()
    for row in ("| Load:", "| SIGKILL during a stream of updates", "| Fuzz", "| Score |"):
        assert row in text, row
