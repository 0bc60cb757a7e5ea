"""ScoreRequest.min_versions, the consistency rule, on the single-process server.

Over real gRPC and HTTP on loopback, on the toy preset (its ``dino`` is trainable, ``saturation``
is not): a met minimum scores at once; one above the served version waits for the update that
brings it (unary, stream and the JSON gateway), holding no decoded-bytes budget meanwhile, and
the response is scored by that version alone; one that never comes fails with
FAILED_PRECONDITION after ``server.min_version_wait_s``; a model not served is NOT_FOUND and an
untrainable one below the minimum FAILED_PRECONDITION at once. In process: ModelHost's
``catch_up`` hook (what the Ray backend's scoring replicas replace), and the trainer's side
(``VersionFloor``, ``RewardStream``)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import re
import time

import grpc
import httpx
import numpy as np
import pytest
import torch

from advgrpo.client import Group, RewardClient
from advgrpo.common.errors import FailedPrecondition, InvalidArgument, NotFound
from advgrpo.common.process import ServerProcess
from advgrpo.common.results import GroupScore
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc
from advgrpo.reward_server.config import ModelConfig, NoopParams, ServerConfig, ServerSettings
from advgrpo.reward_server.host import GroupInput, ModelHost
from advgrpo.reward_server.models.base import ModelUpdate, TrainableRewardModel
from advgrpo.reward_server.models.noop import NoopReward
from advgrpo.trainer.rewards import RewardStream, VersionFloor, check_versions, score_epoch

from .conftest import noise_image, smooth_image

WAIT_S = 3.0  # server.min_version_wait_s of the server here
CONFIG = f"""
server:
  min_version_wait_s: {WAIT_S}
models:
  dino_similarity: null
"""


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("min-versions") / "server.yaml"
    cfg.write_text(CONFIG)
    proc = ServerProcess(["--preset", "toy", "--config", str(cfg)])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.target, timeout_s=60) as c:
        c.wait_ready(60)
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield reward_pb2_grpc.RewardServiceStub(channel)
    channel.close()


def update(client: RewardClient, seed: int) -> int:
    rng = np.random.default_rng(seed)
    refs = [Group("a cat", [smooth_image(rng, 32) for _ in range(2)])]
    gens = [Group("a cat", [noise_image(rng, 32) for _ in range(2)])]
    return client.update_discriminator("dino", refs, gens).version


def probe(seed: int = 0, groups: int = 1) -> list[Group]:
    rng = np.random.default_rng(seed)
    return [Group(f"p{i}", [smooth_image(rng, 32), noise_image(rng, 32)], f"g{i}") for i in range(groups)]


def dino_version(client: RewardClient) -> int:
    return {m.name: m.version for m in client.list_models()}["dino"]


def inflight_decoded_bytes(server) -> float:
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    (value,) = re.findall(r"^advgrpo_inflight_decoded_bytes (\S+)$", text, re.M)
    return float(value)


def raw_image(h: int = 8, w: int = 8) -> reward_pb2.Image:
    return reward_pb2.Image(encoding=reward_pb2.ENCODING_RAW_RGB8, height=h, width=w, data=bytes(h * w * 3))


def expect_refused(stub, min_versions: dict, code: grpc.StatusCode) -> tuple[str, float]:
    request = reward_pb2.ScoreRequest(
        groups=[reward_pb2.ImageGroup(prompt="a", images=[raw_image()])],
        weights={"dino": 1.0},
        min_versions=min_versions,
    )
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=60)
    assert info.value.code() == code, info.value.details()
    return info.value.details(), time.monotonic() - t0


@pytest.mark.slow
def test_a_minimum_already_met_scores_at_once(client):
    version = update(client, 1)
    assert version >= 1
    for asked in ({"dino": version}, {"dino": 0}, {"dino": version, "saturation": 0}, {}):
        t0 = time.monotonic()
        scored = client.score(probe(1, groups=2), {"dino": 1.0, "saturation": 0.5}, asked)
        assert time.monotonic() - t0 < WAIT_S / 2, asked
        assert [s.model_versions for s in scored] == [{"dino": version, "saturation": 0}] * 2
    # A minimum for a model the request does not score is honoured all the same (and met here).
    (only,) = client.score(probe(2), {"saturation": 1.0}, {"dino": version})
    assert only.model_versions == {"saturation": 0}


@pytest.mark.slow
def test_a_score_waits_for_the_update_it_needs_and_is_scored_by_that_version_alone(server, client):
    version = dino_version(client)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(client.score, probe(3, groups=3), {"dino": 1.0}, {"dino": version + 1})
        time.sleep(0.5)
        assert not waiting.done()  # the server has version `version`: the call waits for the next
        # It waits before decoding: it holds none of the server's decoded-bytes budget.
        assert inflight_decoded_bytes(server) == 0
        assert update(client, 30) == version + 1  # another client's update, while the Score waits
        scored = waiting.result(timeout=30)
    assert [s.model_versions["dino"] for s in scored] == [version + 1] * 3
    # The same groups scored afterwards give the same rewards: every image saw the new version.
    again = client.score(probe(3, groups=3), {"dino": 1.0})
    assert [s.rewards for s in again] == [s.rewards for s in scored]


@pytest.mark.slow
def test_a_stream_carries_min_versions_and_waits_too(client):
    version = dino_version(client)
    met = list(client.score_stream(iter(probe(4, groups=3)), {"dino": 1.0}, {"dino": version}))
    assert [s.model_versions["dino"] for s in met] == [version] * 3
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(
            lambda: list(client.score_stream(iter(probe(5, groups=3)), {"dino": 1.0}, {"dino": version + 1}))
        )
        time.sleep(0.5)
        assert not waiting.done()
        assert update(client, 40) == version + 1
        streamed = waiting.result(timeout=30)
    assert [s.model_versions["dino"] for s in streamed] == [version + 1] * 3


@pytest.mark.slow
def test_a_version_that_never_comes_fails_with_failed_precondition(client, stub):
    version = dino_version(client)
    details, elapsed = expect_refused(stub, {"dino": version + 5}, grpc.StatusCode.FAILED_PRECONDITION)
    assert "'dino'" in details and f"version {version + 5} required" in details, details
    assert f"serves version {version}" in details and "server.min_version_wait_s" in details, details
    assert WAIT_S - 0.2 <= elapsed < WAIT_S + 10
    # The server is still up and scores as before.
    (scored,) = client.score(probe(6), {"dino": 1.0}, {"dino": version})
    assert scored.model_versions == {"dino": version}


@pytest.mark.slow
def test_unknown_and_untrainable_models_are_refused_at_once(client, stub):
    details, elapsed = expect_refused(stub, {"nope": 1}, grpc.StatusCode.NOT_FOUND)
    assert "min_versions['nope']" in details and "not served" in details, details
    details, elapsed = expect_refused(stub, {"saturation": 1}, grpc.StatusCode.FAILED_PRECONDITION)
    assert "min_versions['saturation']" in details and "not trainable" in details, details
    assert elapsed < WAIT_S / 2  # it can never catch up: no wait
    with pytest.raises(ValueError, match=r"min_versions\['dino'\]: a version is an integer >= 0, got -1"):
        client.score(probe(), {"dino": 1.0}, {"dino": -1})  # refused by the client, before sending


@pytest.mark.slow
def test_the_http_gateway_takes_min_versions(server, client):
    version = dino_version(client)
    image = smooth_image(np.random.default_rng(7), 32)
    group = {
        "group_id": "g0",
        "prompt": "a cat",
        "images": [
            {"encoding": "ENCODING_RAW_RGB8", "height": 32, "width": 32, "data": base64.b64encode(image).decode()}
        ],
    }

    def post(min_versions: dict) -> httpx.Response:
        body = {"groups": [group], "weights": {"dino": 1.0}, "min_versions": min_versions}
        return httpx.post(f"{server.http}/v1/score", json=body, timeout=60)

    met = post({"dino": str(version)})  # uint64 in proto3 JSON: a string (a number is accepted too)
    assert met.status_code == 200, met.text
    assert int(met.json()["groups"][0]["model_versions"]["dino"]) == version
    missing = post({"nope": 1})
    assert missing.status_code == 404 and "min_versions['nope']" in missing.json()["error"]
    untrainable = post({"saturation": 1})
    assert untrainable.status_code == 409 and "not trainable" in untrainable.json()["error"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(post, {"dino": version + 1})
        time.sleep(0.5)
        assert not waiting.done()
        assert update(client, 50) == version + 1
        caught_up = waiting.result(timeout=30)
    assert caught_up.status_code == 200, caught_up.text
    assert int(caught_up.json()["groups"][0]["model_versions"]["dino"]) == version + 1
    never = post({"dino": version + 9})
    assert never.status_code == 409 and "server.min_version_wait_s" in never.json()["error"]


@pytest.mark.slow
def test_the_trainers_reward_stream_asks_for_its_floor(client):
    """RewardStream (the trainer's scoring) sends its floor with every group: groups submitted
    while the discriminator's update is on its way come back scored by the updated version."""
    version = dino_version(client)
    floor = VersionFloor({"dino": version})
    floor.raise_to("dino", version + 1)  # as after an update the server acknowledges in a moment
    stream = RewardStream(client, {"dino": 1.0}, overlap=True, min_versions=floor.min_versions())
    for i, group in enumerate(probe(8, groups=3)):
        stream.submit(f"g{i}", group.prompt, group.images)
    time.sleep(0.5)
    assert update(client, 60) == version + 1
    scores = score_epoch(stream, budget_s=30, epoch=0)
    assert [s.model_versions["dino"] for s in scores] == [version + 1] * 3
    # Unary scoring (overlap off) carries it too.
    blocking = RewardStream(client, {"dino": 1.0}, overlap=False, min_versions=floor.min_versions())
    blocking.submit("g", "a cat", probe(9)[0].images)
    assert [s.model_versions for s in blocking.collect()] == [{"dino": version + 1}]


# ---------------------------------------------------------------- the trainer's floor


def test_version_floor_only_rises_and_is_sent_as_a_copy():
    floor = VersionFloor({"dino": 3, "pickscore": 0})
    floor.raise_to("dino", 5)
    floor.raise_to("dino", 4)  # a replayed, older answer never lowers it
    floor.raise_to("other", 2)
    sent = floor.min_versions()
    assert sent == {"dino": 5, "pickscore": 0, "other": 2}
    sent["dino"] = 0
    assert floor.min_versions()["dino"] == 5
    fine = [GroupScore("g0", [0.1], {"dino": [0.1]}, {"dino": 5}), GroupScore("g1", [0.2], {"ocr": [0.2]}, {"ocr": 0})]
    floor.check(fine)  # models a group was not scored by are not asked about
    stale = [GroupScore("g2", [0.1], {"dino": [0.1]}, {"dino": 4})]
    with pytest.raises(RuntimeError, match=r"group 'g2': model 'dino' scored it with version 4, below version 5"):
        floor.check(stale)
    check_versions(stale, {})  # no floor, nothing to check


# ---------------------------------------------------------------- ModelHost in process: the hook


class Counter(TrainableRewardModel):
    """A trainable model whose score is its bias; an update adds 1 to the bias."""

    kind = "counter"

    def __init__(self, name: str):
        super().__init__(name)
        self.bias = torch.zeros(1)

    def score(self, images, prompts) -> np.ndarray:
        return np.full(len(images), float(self.bias), np.float32)

    def update(self, references, reference_prompts, generated, generated_prompts, steps) -> ModelUpdate:
        self.bias = self.bias + 1
        return ModelUpdate(0.0, float(self.bias), float(self.bias), 1.0)

    def export_state(self):
        return {"bias": self.bias.clone()}, {}

    def import_state(self, tensors, metadata) -> None:
        self.bias = tensors["bias"].clone()


def make_host(wait_s: float) -> ModelHost:
    config = ServerConfig(
        server=ServerSettings(port=0, http_port=None, shared_memory=False, min_version_wait_s=wait_s),
        models=[ModelConfig("d", "noop", NoopParams(), weight=1.0), ModelConfig("const", "noop", NoopParams())],
    )
    return ModelHost(config, {"d": Counter("d"), "const": NoopReward("const", NoopParams(value=0.5))})


def groups(n: int = 2) -> list[GroupInput]:
    return [GroupInput(f"g{i}", "p", [np.zeros((4, 4, 3), np.uint8)] * 2) for i in range(n)]


def test_the_default_catch_up_waits_for_a_local_update_or_fails():
    async def main():
        host = make_host(wait_s=5.0)
        try:
            waiting = asyncio.create_task(host.score(groups(), {"d": 1.0}, {"d": 1}))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            assert (await host.update("d", groups(1), groups(1), 1)).version == 1
            scored = await asyncio.wait_for(waiting, 5)
            assert [(s.model_versions, s.rewards) for s in scored] == [({"d": 1}, [1.0, 1.0])] * 2
            # A version no update brings: FAILED_PRECONDITION once the wait is over.
            host.config.server.min_version_wait_s = 0.2
            t0 = time.monotonic()
            with pytest.raises(FailedPrecondition, match=r"version 3 required, but model 'd' serves version 1"):
                await host.score(groups(), {"d": 1.0}, {"d": 3})
            assert 0.15 <= time.monotonic() - t0 < 2
            # Checked before any wait: names, versions (a direct caller's), untrainable models.
            with pytest.raises(NotFound, match=r"min_versions\['x'\]"):
                await host.score(groups(), {"d": 1.0}, {"x": 0})
            for bad in (-1, True, "1", 1.0):
                with pytest.raises(InvalidArgument, match=r"min_versions\['d'\]: a version is an integer"):
                    await host.score(groups(), {"d": 1.0}, {"d": bad})
            with pytest.raises(FailedPrecondition, match="'const' is not trainable"):
                await host.score(groups(), {"d": 1.0}, {"const": 1})
            assert (await host.score(groups(1), {"const": 1.0}, {"const": 0, "d": 1}))[0].model_versions == {"const": 0}
        finally:
            await host.close()

    asyncio.run(main())


def test_another_backend_replaces_catch_up():
    """What a scoring replica of the Ray backend does: its own ``catch_up`` (a fetch of the state
    from the discriminator's owner) installs the version the request needs."""

    async def main():
        host = make_host(wait_s=4.0)
        calls = []

        async def fetch(name: str, required: int, timeout_s: float) -> None:
            calls.append((name, required, timeout_s))
            assert await host.install_state(name, required, {"bias": torch.full((1,), 7.0)}, {})

        host.catch_up = fetch
        try:
            scored = await host.score(groups(), {"d": 1.0}, {"d": 5})
            assert [(s.model_versions, s.rewards) for s in scored] == [({"d": 5}, [7.0, 7.0])] * 2
            assert len(calls) == 1 and calls[0][:2] == ("d", 5) and 3.5 < calls[0][2] <= 4.0
            # Met already: the hook is not asked again.
            await host.score(groups(), {"d": 1.0}, {"d": 5})
            assert len(calls) == 1

            async def gives_up(name: str, required: int, timeout_s: float) -> None:
                return None  # a hook that returns without the version: refused all the same

            host.catch_up = gives_up
            with pytest.raises(FailedPrecondition, match=r"version 6 required, but model 'd' serves version 5"):
                await host.score(groups(), {"d": 1.0}, {"d": 6})
        finally:
            await host.close()

    asyncio.run(main())
