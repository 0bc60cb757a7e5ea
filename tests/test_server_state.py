"""Learning, determinism and durable state of the discriminators, through a real server process."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from advgrpo.client import Group, RewardClient

from .conftest import noise_image, smooth_image

pytestmark = pytest.mark.slow


def kinds(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [smooth_image(rng) for _ in range(n)], [noise_image(rng) for _ in range(n)]


def test_discriminator_learns_references_from_generations(start_server):
    server = start_server("--preset", "tiny", "--no-http")
    train_refs, train_gens = kinds(10, 24)
    test_refs, test_gens = kinds(11, 12)
    with RewardClient(server.target) as client:
        before = client.score([Group("a", test_refs, "refs"), Group("a", test_gens, "gens")], {"dino": 1.0})
        for _ in range(8):
            result = client.update_discriminator("dino", [Group("a", train_refs)], [Group("a", train_gens)], steps=5)
        assert result.version == 8
        assert result.reference_score > result.generated_score
        held_out = client.score([Group("a", test_refs, "refs"), Group("a", test_gens, "gens")], {"dino": 1.0})
    refs, gens = np.array(held_out[0].rewards), np.array(held_out[1].rewards)
    untrained_gap = np.mean(before[0].rewards) - np.mean(before[1].rewards)
    assert abs(untrained_gap) < 0.1  # the random head does not tell them apart
    assert refs.mean() > gens.mean() + 0.5, (refs, gens)
    # Pairwise: a held-out reference beats a held-out generation in most pairs (AUC).
    auc = (refs[:, None] > gens[None, :]).mean()
    assert auc >= 0.85, (auc, refs, gens)


def test_same_image_same_version_same_reward(start_server):
    server = start_server("--preset", "tiny", "--no-http")
    refs, gens = kinds(20, 4)
    with RewardClient(server.target) as client:
        a = client.score([Group("p", refs + gens)], {"dino": 1.0, "pickscore": 1.0})[0]
        # The same request again: bit-identical.
        assert client.score([Group("p", refs + gens)], {"dino": 1.0, "pickscore": 1.0})[0] == a
        # Other batch companions, other order: the same reward, bit for bit on the CPU (the models
        # score each image there so that its reward does not depend on its batch); on a GPU
        # ("device: auto") cuBLAS may round differently with the batch size, ~1e-8.
        b = client.score([Group("p", gens[::-1] + refs[::-1] + kinds(21, 3)[1])], {"dino": 1.0, "pickscore": 1.0})[0]
        for name in ("dino", "pickscore"):
            want = a.components[name][::-1]
            assert b.components[name][:8] == (pytest.approx(want, abs=1e-6) if torch.cuda.is_available() else want)


def test_restart_resumes_versions_and_scores(start_server, tmp_path):
    state = tmp_path / "state"
    probe = [Group("p", kinds(30, 3)[0] + kinds(30, 3)[1])]
    refs, gens = kinds(31, 4)
    server = start_server("--preset", "tiny", "--no-http", "--state-dir", str(state))
    with RewardClient(server.target) as client:
        for _ in range(3):
            client.update_discriminator("dino", [Group("a", refs)], [Group("a", gens)], steps=2)
        client.update_discriminator("pickscore", [Group("a", refs)], [Group("a", gens)])
        before_versions = {m.name: m.version for m in client.list_models()}
        before_scores = client.score(probe, {"dino": 1.0, "pickscore": 1.0})[0]
    assert before_versions == {"dino": 3, "pickscore": 1, "ocr": 0, "dino_similarity": 0}
    assert server.stop() == 0
    assert (state / "dino.safetensors").exists() and (state / "pickscore.safetensors").exists()

    again = start_server("--preset", "tiny", "--no-http", "--state-dir", str(state))
    with RewardClient(again.target) as client:
        assert {m.name: m.version for m in client.list_models()} == before_versions
        after_scores = client.score(probe, {"dino": 1.0, "pickscore": 1.0})[0]
        assert after_scores.components == before_scores.components
        assert after_scores.model_versions == before_scores.model_versions
        nxt = client.update_discriminator("dino", [Group("a", refs)], [Group("a", gens)], steps=2)
    # An unbroken server doing the same 4th update gets the same loss (optimizer state survived).
    unbroken = start_server("--preset", "tiny", "--no-http", "--state-dir", str(tmp_path / "other"))
    with RewardClient(unbroken.target) as client:
        for _ in range(4):
            ref = client.update_discriminator("dino", [Group("a", refs)], [Group("a", gens)], steps=2)
    assert ref.version == nxt.version == 4
    assert ref.loss == nxt.loss and ref.reference_score == nxt.reference_score


def test_sigkill_loses_no_acknowledged_update(start_server, tmp_path):
    state = tmp_path / "state"
    refs, gens = kinds(40, 4)
    probe = [Group("p", kinds(41, 4)[1])]
    server = start_server("--preset", "tiny", "--no-http", "--state-dir", str(state))
    with RewardClient(server.target) as client:
        for _ in range(4):
            acked = client.update_discriminator("dino", [Group("a", refs)], [Group("a", gens)], steps=3)
        scores = client.score(probe, {"dino": 1.0})[0].rewards
        os.kill(server.proc.pid, signal.SIGKILL)  # no drain, no flush: the ack must already be durable
    server.proc.wait(10)
    again = start_server("--preset", "tiny", "--no-http", "--state-dir", str(state))
    with RewardClient(again.target) as client:
        versions = {m.name: m.version for m in client.list_models()}
        assert versions["dino"] == acked.version == 4
        assert client.score(probe, {"dino": 1.0})[0].rewards == scores


def test_state_of_another_model_is_refused_with_a_clear_error(start_server, tmp_path):
    state = tmp_path / "state"
    server = start_server("--preset", "tiny", "--no-http", "--state-dir", str(state))
    refs, gens = kinds(50, 2)
    with RewardClient(server.target) as client:
        client.update_discriminator("dino", [Group("a", refs)], [Group("a", gens)])
    server.stop()
    cfg = tmp_path / "wider.yaml"
    cfg.write_text("models:\n  dino:\n    params: {head_hidden: 32}\n")
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "advgrpo.reward_server",
            "--preset",
            "tiny",
            "--config",
            str(cfg),
            "--no-http",
            "--port",
            "0",
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "dino.safetensors" in out.stderr and "Traceback" not in out.stderr


def test_dino_runs_through_the_triton_kernels_and_matches_the_reference_path(start_server):
    """With TRITON_INTERPRET=1 the server's dino scores and trains through the Triton kernels
    (as it does on CUDA); without it, through their PyTorch references. Same results."""
    refs, gens = kinds(60, 4)
    probe = [Group("p", kinds(61, 3)[0] + kinds(61, 3)[1])]
    results = []
    for env in ({"TRITON_INTERPRET": "1"}, {"TRITON_INTERPRET": "0"}):
        server = start_server("--preset", "tiny", "--no-http", env=env)
        with RewardClient(server.target) as client:
            update = client.update_discriminator("dino", [Group("a", refs)], [Group("a", gens)], steps=3)
            scores = client.score(probe, {"dino": 1.0})[0].rewards
        results.append((update, scores))
        server.stop()
    (triton_update, triton_scores), (torch_update, torch_scores) = results
    assert triton_update.loss == pytest.approx(torch_update.loss, abs=1e-5)
    assert triton_update.reference_score == pytest.approx(torch_update.reference_score, abs=1e-5)
    assert triton_scores == pytest.approx(torch_scores, abs=1e-5)
