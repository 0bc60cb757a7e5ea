"""Spec behaviours of a real server process that no other test shows: steps=0 is steps=1, health
stays answered while a model computes, concurrent requests are merged into model calls, the
default 64 MiB message limit, and updates of a pickscore model configured as not trainable."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from advgrpo.common.process import ServerProcess
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

from .conftest import noise_image, smooth_image

pytestmark = pytest.mark.slow
MiB = 1 << 20

# Merged over the tiny preset. Nothing sets the message limit: the default (64 MiB) applies.
# dino waits up to 50 ms for company, so concurrent requests reliably share model calls.
CONFIG = """\
models:
  dino: {batching: {max_delay_ms: 50}}
  pickscore: {params: {trainable: false}}
  noop: {kind: noop}
"""
DINO_ONLY = "models:\n  pickscore: null\n  ocr: null\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("behaviour") / "config.yaml"
    cfg.write_text(CONFIG)
    s = ServerProcess(["--preset", "tiny", "--config", str(cfg)])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(server):
    # A large send limit: the server, not this client, is what refuses big messages.
    ch = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 256 * MiB)])
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return reward_pb2_grpc.RewardServiceStub(channel)


def raw(img: np.ndarray) -> reward_pb2.Image:
    h, w, _ = img.shape
    return reward_pb2.Image(encoding=reward_pb2.ENCODING_RAW_RGB8, height=h, width=w, data=img.tobytes())


def group(images, prompt: str = "a cat", group_id: str = "g0") -> reward_pb2.ImageGroup:
    return reward_pb2.ImageGroup(group_id=group_id, prompt=prompt, images=[raw(i) for i in images])


def score_request(images, weights: dict[str, float], prompt: str = "a cat") -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(groups=[group(images, prompt)], weights=weights)


def metric(text: str, name: str, model: str) -> float:
    """One sample of /metrics; 0 for a labelled series not observed yet (it is not listed then)."""
    prefix = f'{name}{{model="{model}"}} '
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    assert len(values) <= 1, values
    return values[0] if values else 0.0


# ---------------------------------------------------------------- (a) steps = 0 means 1


def test_update_with_zero_steps_is_one_step(tmp_path):
    cfg = tmp_path / "dino.yaml"
    cfg.write_text(DINO_ONLY)
    # Two fresh servers, started side by side: one is sent steps=0, the other steps=1.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(ServerProcess, ["--preset", "tiny", "--config", str(cfg)], http=False) for _ in "ab"]
        zero, one = [f.result() for f in starts]
    try:
        rng = np.random.default_rng(7)
        refs = group([smooth_image(rng) for _ in range(3)])
        gens = group([noise_image(rng) for _ in range(3)])
        probe = score_request([smooth_image(rng)], {"dino": 1.0})
        answers = {}
        for name, srv, steps in (("zero", zero, 0), ("one", one, 1)):
            with grpc.insecure_channel(srv.target) as ch:
                s = reward_pb2_grpc.RewardServiceStub(ch)
                before = s.Score(probe, timeout=60).groups[0].rewards[0]
                updates = [
                    s.UpdateDiscriminator(
                        reward_pb2.UpdateDiscriminatorRequest(
                            model="dino", references=[refs], generated=[gens], steps=steps, update_id=f"u{i}"
                        ),
                        timeout=60,
                    )
                    for i in range(2)
                ]
                after = s.Score(probe, timeout=60)
            answers[name] = (before, updates, after.groups[0].rewards[0], after.groups[0].model_versions["dino"])
        (b0, u0, a0, v0), (b1, u1, a1, v1) = answers["zero"], answers["one"]
        assert [u.version for u in u0] == [u.version for u in u1] == [1, 2]
        assert v0 == v1 == 2
        for x, y in zip(u0, u1, strict=True):
            assert not x.replayed and np.isfinite(x.loss)
            fields = (x.loss, x.reference_score, x.generated_score, x.accuracy)
            assert fields == pytest.approx((y.loss, y.reference_score, y.generated_score, y.accuracy), rel=1e-5)
        assert b0 == b1 and a0 == pytest.approx(a1, rel=1e-5)
        assert a0 != b0  # steps=0 trained (one step), it did not skip training
    finally:
        zero.stop()
        one.stop()


# ---------------------------------------------------------------- (b) health during model work


def test_health_is_answered_while_a_long_score_runs(server, channel, stub):
    health = health_pb2_grpc.HealthStub(channel)
    rng = np.random.default_rng(1)
    # Six 1024² noise images through PP-OCR: seconds of model work in one call.
    long_score = score_request([noise_image(rng, 1024) for _ in range(6)], {"ocr": 1.0}, 'a sign "hi"')
    done = threading.Event()

    def run():
        try:
            return stub.Score(long_score, timeout=120)
        finally:
            done.set()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        scoring = pool.submit(run)
        time.sleep(0.5)  # sent, decoded and on the OCR model by now
        latencies = []
        for _ in range(3):
            t0 = time.monotonic()
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            latencies.append(time.monotonic() - t0)
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert not done.is_set(), f"the Score finished first; health latencies {latencies}"
            time.sleep(0.1)
        assert max(latencies) < 1.0, latencies
        result = scoring.result()
    assert len(result.groups[0].rewards) == 6


# ---------------------------------------------------------------- (c) requests merged into model calls


def test_concurrent_requests_are_merged_into_model_calls(server, stub):
    http = httpx.Client(base_url=server.http, timeout=30)

    def counts() -> tuple[float, float]:
        text = http.get("/metrics").text
        return (
            metric(text, "advgrpo_batch_requests_sum", "dino"),
            metric(text, "advgrpo_batch_requests_count", "dino"),
        )

    rng = np.random.default_rng(2)
    requests = [score_request([smooth_image(rng, 32)], {"dino": 1.0}) for _ in range(8)]
    before = counts()
    start = threading.Barrier(len(requests))

    def call(request):
        start.wait()
        return [stub.Score(request, timeout=60).groups[0].rewards[0] for _ in range(3)]

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        rewards = list(pool.map(call, requests))
    after = counts()
    http.close()
    # Each thread got the same reward for its image every time, whatever it was merged with.
    assert all(len(set(r)) == 1 for r in rewards)
    merged_requests, model_calls = after[0] - before[0], after[1] - before[1]
    assert merged_requests == 24  # every request counted once (none split: one image each)
    assert 1 <= model_calls < 24
    assert merged_requests / model_calls > 1.5, (merged_requests, model_calls)


# ---------------------------------------------------------------- (d) the default message limit


def test_default_message_limit_is_64_mib(server, stub):
    img = np.zeros((2048, 2048, 3), dtype=np.uint8)  # 12 MiB raw
    fits = score_request([img] * 5, {"noop": 1.0})  # 60 MiB
    too_big = score_request([img] * 6, {"noop": 1.0})  # 72 MiB
    assert 58 * MiB < fits.ByteSize() < 62 * MiB
    assert 70 * MiB < too_big.ByteSize() < 74 * MiB
    assert len(stub.Score(fits, timeout=120).groups[0].rewards) == 5
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(too_big, timeout=120)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert len(stub.Score(score_request([img[:8, :8]], {"noop": 1.0}), timeout=30).groups[0].rewards) == 1


# ---------------------------------------------------------------- (e) a pickscore not trainable


def test_update_of_pickscore_configured_not_trainable_is_failed_precondition(stub):
    models = {m.name: m for m in stub.ListModels(reward_pb2.ListModelsRequest(), timeout=30).models}
    assert not models["pickscore"].trainable and models["dino"].trainable
    rng = np.random.default_rng(3)
    request = reward_pb2.UpdateDiscriminatorRequest(
        model="pickscore", references=[group([smooth_image(rng)])], generated=[group([noise_image(rng)])]
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.UpdateDiscriminator(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "pickscore" in info.value.details()
    # Still scored, at version 0.
    scored = stub.Score(score_request([smooth_image(rng)], {"pickscore": 1.0}), timeout=60)
    assert scored.groups[0].model_versions["pickscore"] == 0
