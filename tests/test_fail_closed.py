"""Issue 15, fail closed: a NaN or infinite score, or a model that raises, fails the request and
is counted; zero-variance groups and constant models are counted and shown; the client refuses a
non-finite reward from any server."""

from __future__ import annotations

import asyncio
import threading
from typing import Sequence

import grpc
import httpx
import numpy as np
import pytest

from advgrpo.client import Group, RewardClient
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc
from advgrpo.reward_server.config import ModelConfig, NoopParams, ServerConfig, ServerSettings
from advgrpo.reward_server.host import ModelHost
from advgrpo.reward_server.models.base import RewardModel
from advgrpo.reward_server.rpc.server import GrpcFrontend
from advgrpo.reward_server.score_watch import nonfinite_counts, zero_variance


class BrittleJudge(RewardModel):
    """A judge that breaks on some inputs, as real ones do: NaN on an all-black image, infinity on
    an all-white one, an exception on a pure red one; otherwise the mean brightness."""

    kind = "brittle"

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        out = []
        for img in images:
            if (img == 0).all():
                out.append(np.nan)
            elif (img == 255).all():
                out.append(np.inf)
            elif (img[..., 0] == 255).all() and (img[..., 1:] == 0).all():
                raise RuntimeError("the judge's tokenizer choked")
            else:
                out.append(img.mean() / 255.0)
        return np.asarray(out, dtype=np.float32)


def solid(value) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.uint8), (8, 8, 3)).copy()


def varied(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 250, (8, 8, 3), dtype=np.uint8)


@pytest.fixture
def judge_server():
    """A real gRPC frontend and host, in this process, hosting the brittle judge and a constant."""
    models = {"judge": BrittleJudge("judge"), "const": None}
    config = ServerConfig(
        server=ServerSettings(port=0, http_port=None, shared_memory=False),
        models=[
            ModelConfig("judge", "noop", NoopParams(), weight=1.0),
            ModelConfig("const", "noop", NoopParams(value=0.5)),
        ],
    )
    from advgrpo.reward_server.models.noop import NoopReward

    models["const"] = NoopReward("const", NoopParams(value=0.5))
    host = ModelHost(config, models)
    ready, stop = threading.Event(), None
    box = {}

    async def serve():
        nonlocal stop
        stop = asyncio.Event()
        frontend = GrpcFrontend(host)
        await frontend.start()
        box["target"] = f"127.0.0.1:{frontend.port}"
        ready.set()
        await stop.wait()
        await frontend.server.stop(0)
        await host.close()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield box["target"], host
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


def test_nan_and_inf_fail_the_request_naming_the_model_and_the_image(judge_server):
    target, host = judge_server
    with RewardClient(target, timeout_s=30) as client:
        good = client.score([Group("p", [varied(0), varied(1)], "g0")])
        assert all(np.isfinite(good[0].rewards))
        for bad, word in ((solid(0), "nan"), (solid(255), "inf")):
            groups = [Group("p", [varied(2)], "ok"), Group("p", [varied(3), bad], "bad-group")]
            # A stream sends each group as its own message: there it is message 1's groups[0].
            for call, where in (
                (lambda g=groups: client.score(g), "groups[1]"),
                (lambda g=groups: list(client.score_stream(g)), "stream message 1: model 'judge' scored groups[0]"),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.INTERNAL
                details = info.value.details()
                assert "model 'judge' scored" in details and where in details, details
                assert "images[1] (group_id 'bad-group')" in details and word in details.lower(), details
        # With weight 0 too: a failure is not hidden by the weights.
        with pytest.raises(grpc.RpcError, match="model 'judge'"):
            client.score([Group("p", [solid(0)])], {"const": 1.0, "judge": 0.0})
    health = host.watch.snapshot("judge")
    assert health["nan"] == 3 and health["inf"] == 2
    text = host.metrics.render().decode()
    assert 'advgrpo_nonfinite_scores_total{kind="nan",model="judge"} 3.0' in text
    assert 'advgrpo_nonfinite_scores_total{kind="inf",model="judge"} 2.0' in text


def test_a_model_that_raises_fails_its_requests_and_is_counted(judge_server):
    target, host = judge_server
    with RewardClient(target, timeout_s=30) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.score([Group("p", [varied(4), solid((255, 0, 0))])])
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "tokenizer choked" in info.value.details()
        assert client.score([Group("p", [varied(5)])])[0].rewards  # the server is fine afterwards
    assert host.watch.snapshot("judge")["failures"] == 1
    assert 'advgrpo_model_failures_total{model="judge"} 1.0' in host.metrics.render().decode()


def test_zero_variance_groups_and_a_constant_model_are_counted(judge_server):
    target, host = judge_server
    with RewardClient(target, timeout_s=30) as client:
        for i in range(host.watch.window):
            assert not host.watch.snapshot("const")["constant"]
            client.score([Group("p", [varied(10 * i), varied(10 * i + 1)]), Group("p", [varied(99)])],
                         {"judge": 1.0, "const": 0.0})  # fmt: skip
    judge, const = host.watch.snapshot("judge"), host.watch.snapshot("const")
    # Groups of one image carry no variance to lose: only groups of two or more count.
    assert judge["groups"] == const["groups"] == host.watch.window
    assert judge["zero_variance_groups"] == 0 and not judge["constant"]
    assert const["zero_variance_groups"] == host.watch.window and const["zero_variance_share"] == 1.0
    assert const["constant"]
    text = host.metrics.render().decode()
    assert 'advgrpo_model_scores_constant{model="const"} 1.0' in text
    assert 'advgrpo_model_scores_constant{model="judge"} 0.0' in text
    assert f'advgrpo_zero_variance_groups_total{{model="const"}} {float(host.watch.window)}' in text


def test_the_score_watch_rules():
    assert nonfinite_counts([0.0, float("nan"), float("inf"), -float("inf"), 1.0]) == (1, 2)
    assert zero_variance([0.3, 0.3]) and not zero_variance([0.3]) and not zero_variance([0.3, 0.30000001])


def test_the_client_refuses_a_non_finite_reward_from_any_server(in_process_server):
    class NaNServer(reward_pb2_grpc.RewardServiceServicer):
        def Score(self, request, context):
            return reward_pb2.ScoreResponse(
                groups=[reward_pb2.GroupScores(group_id=g.group_id, rewards=[float("nan")] * len(g.images))
                        for g in request.groups]
            )  # fmt: skip

    target = in_process_server(lambda s: reward_pb2_grpc.add_RewardServiceServicer_to_server(NaNServer(), s))
    with RewardClient(target, timeout_s=10) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.score([Group("p", [varied(0)], "g")])
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "group 'g': the server sent rewards[0] = nan; refused" in info.value.details()


@pytest.mark.slow
def test_a_constant_model_shows_on_metrics_and_stats_of_a_real_server(start_server, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  noop: {kind: noop, weight: 1.0, params: {value: 0.25}}\n")
    server = start_server("--config", str(cfg))
    with RewardClient(server.target) as client:
        for i in range(8):
            client.score([Group("p", [varied(i), varied(i + 1), varied(i + 2)])])
    with httpx.Client(base_url=server.http, timeout=30) as http:
        (noop,) = http.get("/v1/stats").json()["models"]
        metrics = http.get("/metrics").text
    assert noop["health"]["constant"] is True and noop["health"]["zero_variance_groups"] == 8
    assert noop["health"]["failures"] == noop["health"]["nan"] == noop["health"]["inf"] == 0
    assert 'advgrpo_model_scores_constant{model="noop"} 1.0' in metrics


def test_a_model_that_scores_nan_at_warm_up_never_serves(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  noop: {kind: noop, weight: 1.0, params: {value: .nan}}\n")
    out = subprocess.run(
        [sys.executable, "-m", "advgrpo.reward_server", "--config", str(cfg), "--port", "0", "--no-http"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "warm-up returned" in out.stderr, out.stderr[-2000:]


# ---------------------------------------------------------------- the trainer


def test_zero_variance_share_counts_groups_whose_rewards_are_all_equal():
    import torch

    from advgrpo.trainer.rewards import zero_variance_share

    rewards = torch.tensor([0.5, 0.5, 0.1, 0.2, 0.0, 0.0, 0.0, 0.3])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    assert zero_variance_share(rewards, ids) == 2 / 3  # groups 0 and 2 of 0..2 (3 has one image: not a group)


class _Switch(BrittleJudge):
    """The brittle judge, broken (NaN for every image) for its next ``failures`` calls."""

    failures = 0

    def score(self, images, prompts):
        if self.failures:
            self.failures -= 1
            return np.full(len(images), np.nan, dtype=np.float32)
        return super().score(images, prompts)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False], ids=["stream", "unary"])
def test_the_trainer_never_trains_on_failed_rewards_retries_then_stops(judge_server, tmp_path, overlap):
    import torch

    from advgrpo.trainer.config import load_train_config
    from advgrpo.trainer.loop import AdvGrpoTrainer
    from advgrpo.trainer.rewards import RewardsFailed

    target, host = judge_server
    judge = host._hosted["judge"].model
    judge.__class__ = _Switch  # the same model object, now able to break
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = load_train_config(
        "tiny",
        sets=["adversarial.discriminator=", f"data.prompts={prompts}", "reward.retry_budget_s=3", "run.tensorboard=false",
              "reward.shared_memory=false", f"reward.overlap={str(overlap).lower()}"],
        overrides={"reward": {"server": target, "weights": {"judge": 1.0}}, "run": {"output_dir": str(tmp_path / "run")}},
    )  # fmt: skip
    with AdvGrpoTrainer(cfg) as trainer:
        # A failure that passes: the epoch's groups are scored again, and it trains once.
        judge.failures = 1
        metrics = trainer.train_epoch(0)
        assert trainer.state.global_step == 1 and np.isfinite(metrics["reward_mean"])
        assert 0.0 <= metrics["zero_variance_share"] <= 1.0
        # A failure that lasts: nothing is trained, and the run stops with a message.
        judge.failures = 10**6
        before = [p.detach().clone() for p in trainer.lora_params]
        with pytest.raises(
            RewardsFailed, match=r"epoch 1: the reward server did not score this epoch's 2 groups"
        ) as info:
            trainer.train_epoch(1)
        assert "reward.retry_budget_s=3" in str(info.value) and "model 'judge' scored" in str(info.value)
        assert trainer.state.global_step == 1
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.lora_params, strict=True))


def test_a_weighted_reward_that_overflows_is_an_error_not_infinity(judge_server):
    target, _ = judge_server
    bright = np.full((8, 8, 3), 230, np.uint8)
    with RewardClient(target, timeout_s=30) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.score([Group("p", [varied(0), bright], "g")], {"judge": 3e38, "const": 3e38})
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "the weighted reward of groups[0].images[1] (group_id 'g') is inf" in info.value.details()


@pytest.mark.slow
def test_an_update_that_breaks_the_discriminator_is_rolled_back_not_acknowledged(start_server, tmp_path):
    """A learning rate that blows the head up: the update is refused (INTERNAL, naming the model),
    rolled back and never saved; the version and the scores stay as they were."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "models:\n  dino: {params: {lr: 1.0e+38}}\n  pickscore: null\n  ocr: null\n  dino_similarity: null\n"
    )
    state = tmp_path / "state"
    server = start_server("--preset", "tiny", "--config", str(cfg), "--state-dir", str(state), "--no-http")
    refs, gens = [Group("r", [varied(i) for i in range(4)])], [Group("g", [solid(i * 40 + 10) for i in range(4)])]
    probe = [Group("p", [varied(7), varied(8)])]
    with RewardClient(server.target, timeout_s=60) as client:
        before = client.score(probe)[0].rewards
        with pytest.raises(grpc.RpcError) as info:
            client.update_discriminator("dino", refs, gens, steps=3)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "model 'dino'" in info.value.details() and "rolled back, not applied" in info.value.details()
        assert {m.name: m.version for m in client.list_models()}["dino"] == 0
        assert client.score(probe)[0].rewards == before
    assert not (state / "dino.safetensors").exists()
