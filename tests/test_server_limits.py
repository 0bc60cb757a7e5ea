"""Issue 15, limits: concurrent RPCs over ``server.max_concurrent_rpcs`` get RESOURCE_EXHAUSTED at
once with a retry hint (probes still answer), and the model never runs for a call that expired
or was cancelled while it waited. (The other limits, message size, images per request, image
side, decoded bytes per request and in flight, queue depth, are tested in test_server_grpc.py,
test_server_input_limits.py and test_server_overload.py.)"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from advgrpo.client import Group, RewardClient
from advgrpo.common.protocol import RETRY_PUSHBACK_KEY
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc


def request(n: int = 1) -> reward_pb2.ScoreRequest:
    image = reward_pb2.Image(encoding=reward_pb2.ENCODING_RAW_RGB8, height=2, width=2, data=bytes(12))
    return reward_pb2.ScoreRequest(groups=[reward_pb2.ImageGroup(prompt="p", images=[image] * n)])


def model_calls(http: str) -> int:
    text = httpx.get(f"{http}/metrics", timeout=10).text
    match = re.search(r'^advgrpo_batch_size_images_count\{model="noop"\} (\S+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


@pytest.fixture
def slow_server(start_server, tmp_path):
    """A noop model that takes 400 ms a call, one request per call, at most 2 RPCs at once."""
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(
        "server: {max_concurrent_rpcs: 2}\n"
        "models:\n  noop: {kind: noop, weight: 1.0, params: {delay_ms: 400},"
        " batching: {max_batch_size: 1, max_delay_ms: 0}}\n"
    )
    return start_server("--config", str(cfg))


def test_concurrent_rpcs_over_the_limit_are_refused_at_once_with_a_retry_hint(slow_server):
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def call():
            t0 = time.perf_counter()
            try:
                stub.Score(request(), timeout=30)
                return "OK", time.perf_counter() - t0, None
            except grpc.RpcError as exc:
                pushback = dict(exc.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY)
                return exc.code().name, time.perf_counter() - t0, (exc.details(), pushback)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(call) for _ in range(6)]
            time.sleep(0.15)  # the first calls hold both slots: probes still answer
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            results = [f.result() for f in futures]
    refused = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
    assert {r[0] for r in results} == {"OK", "RESOURCE_EXHAUSTED"} and len(refused) >= 3, results
    for _, elapsed, (details, pushback) in refused:
        assert "server.max_concurrent_rpcs: 2 RPCs already in progress" in details
        assert pushback == "100" and elapsed < 0.3  # at once, not after waiting for a slot
    # Our client retries such a refusal (transient) and every call gets its score.
    with RewardClient(slow_server.target, timeout_s=60) as client:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            scores = list(pool.map(lambda i: client.score([Group("p", [np.zeros((2, 2, 3), np.uint8)])]), range(5)))
    assert all(s[0].rewards == [0.0] for s in scores)


def test_the_model_never_runs_for_an_expired_or_cancelled_call(slow_server):
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        before = model_calls(slow_server.http)
        running = threading.Thread(target=lambda: stub.Score(request(), timeout=30))
        running.start()
        time.sleep(0.1)  # the model is busy with that one for 400 ms
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(request(), timeout=0.15)  # expires while it waits in the queue
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        running.join()
        future = stub.Score.future(request())  # cancelled by its caller while it waits
        time.sleep(0.05)
        waiting = stub.Score.future(request())
        time.sleep(0.05)
        waiting.cancel()
        future.result(timeout=30)
        time.sleep(0.6)  # long enough for a call the model might still have made
        assert model_calls(slow_server.http) - before == 2  # the first call and `future`, nothing else


def concurrent_rpcs(http: str) -> float:
    text = httpx.get(f"{http}/metrics", timeout=10).text
    return float(re.search(r"^advgrpo_concurrent_rpcs (\S+)$", text, re.M).group(1))


def test_every_way_an_rpc_ends_gives_its_slot_back(slow_server):
    """Answered, failed, expired, and streams cancelled mid-way or while waiting: the count of RPCs
    in progress is back to 0 after each, so the limit never fills with calls long gone."""
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        stub.Score(request(), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Score(reward_pb2.ScoreRequest(), timeout=30)  # INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            stub.Score(request(), timeout=0.05)  # DEADLINE_EXCEEDED
        stream = stub.ScoreStream(iter([request(), request(), request()]), timeout=30)
        next(stream)
        stream.cancel()  # mid-stream, with messages still to answer
        waiting = stub.ScoreStream(iter([request()] * 3), timeout=30)
        time.sleep(0.1)
        waiting.cancel()
        deadline = time.monotonic() + 10
        while concurrent_rpcs(slow_server.http) != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert concurrent_rpcs(slow_server.http) == 0
        futures = [stub.Score.future(request()) for _ in range(2)]  # both slots usable again
        assert all(f.result(timeout=30).groups[0].rewards == [0.0] for f in futures)
