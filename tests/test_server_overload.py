"""The server-wide budget of decoded image bytes in flight (``server.max_inflight_decoded_bytes``)
and transient refusals: a request that finds the budget taken by others gets RESOURCE_EXHAUSTED
with a retry hint (gRFC A6's pushback trailer ``grpc-retry-pushback-ms``, HTTP ``Retry-After``),
which the client honours; a request over a size limit gets the pushback -1 (A6: do not retry)
and is never retried."""

from __future__ import annotations

import re
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from advgrpo.client import Group, RetryPolicy, RewardClient
from advgrpo.common.errors import ConfigError, ResourceExhausted
from advgrpo.common.protocol import NO_RETRY_PUSHBACK, RETRY_PUSHBACK_KEY
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc
from advgrpo.reward_server.config import load_config
from advgrpo.reward_server.host import DecodedBytesBudget, DecodedBytesTicket

from .test_http import group_json

SIDE = 100  # 100x100 RGB: 30 000 bytes per image
PER_IMAGE = SIDE * SIDE * 3
CONFIG = f"""
server:
  max_request_decoded_bytes: {3 * PER_IMAGE}
  max_inflight_decoded_bytes: {5 * PER_IMAGE}
models:
  noop: {{kind: noop, weight: 1.0, params: {{value: 0.5, delay_ms: 600}}, batching: {{enabled: false}}}}
"""


def image_msg(value: int = 0) -> reward_pb2.Image:
    return reward_pb2.Image(
        encoding=reward_pb2.ENCODING_RAW_RGB8, height=SIDE, width=SIDE, data=bytes([value]) * PER_IMAGE
    )


def request(n: int) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(groups=[reward_pb2.ImageGroup(prompt="p", images=[image_msg()] * n)])


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def refused(server) -> float:
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    found = re.findall(
        r'advgrpo_rpc_requests_total\{code="RESOURCE_EXHAUSTED",method="[^"]*Score(?:Stream)?"\} (\S+)', text
    )
    return sum(float(v) for v in found)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from advgrpo.common.process import ServerProcess

    cfg = tmp_path_factory.mktemp("overload") / "server.yaml"
    cfg.write_text(CONFIG)
    server = ServerProcess(["--config", str(cfg)])
    yield server
    server.stop()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)


def test_budget_and_tickets():
    budget = DecodedBytesBudget(100)
    a, b = DecodedBytesTicket(budget), DecodedBytesTicket(budget)
    a.take(60, 2)
    with pytest.raises(ResourceExhausted, match="hold 60 of server.max_inflight_decoded_bytes = 100") as err:
        b.take(50, 1)
    assert err.value.retry_after_s == DecodedBytesBudget.RETRY_AFTER_S
    b.take(40, 1)  # fits exactly
    assert budget.held == 100
    a.release()
    a.release()  # a second release gives nothing back twice
    assert budget.held == 40
    b.release()
    assert budget.held == 0
    late = DecodedBytesTicket(budget)
    late.release()  # the request was cancelled before its decode ran
    with pytest.raises(RuntimeError, match="ended before"):
        late.take(10, 1)
    assert budget.held == 0  # a share taken after its release would never have come back


def test_the_server_wide_budget_is_at_least_one_request():
    with pytest.raises(ConfigError, match="server.max_inflight_decoded_bytes: must be >= server.max_request"):
        load_config(
            "noop", overrides={"server": {"max_request_decoded_bytes": 1000, "max_inflight_decoded_bytes": 999}}
        )


@pytest.mark.slow
def test_a_request_over_the_budget_left_is_refused_with_a_retry_hint(server, stub):
    first = stub.Score.future(request(3), timeout=30)  # holds 3 of 5 images' worth for 0.6 s
    deadline = time.monotonic() + 10
    while metric(server, "advgrpo_inflight_decoded_bytes") < 3 * PER_IMAGE:
        assert time.monotonic() < deadline and not first.done()
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request(3), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server.max_inflight_decoded_bytes" in info.value.details()
    assert dict(info.value.trailing_metadata())[RETRY_PUSHBACK_KEY] == "100"
    # While it is held, the JSON gateway refuses likewise, with Retry-After.
    body = {"groups": [group_json([np.zeros((SIDE, SIDE, 3), np.uint8)] * 3)]}
    r = httpx.post(f"{server.http}/v1/score", json=body, timeout=30)
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert stub.Score(request(2), timeout=30).groups[0].rewards == [0.5, 0.5]  # 3 + 2 fits
    assert list(first.result().groups[0].rewards) == [0.5] * 3
    assert metric(server, "advgrpo_inflight_decoded_bytes") == 0  # every share given back


@pytest.mark.slow
def test_a_request_over_a_size_limit_is_marked_not_to_be_retried(server, stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request(4), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server.max_request_decoded_bytes" in info.value.details()
    assert dict(info.value.trailing_metadata() or ())[RETRY_PUSHBACK_KEY] == NO_RETRY_PUSHBACK  # "-1"


@pytest.mark.slow
def test_the_client_retries_transient_refusals_and_not_size_limits(server):
    """Three clients at once each send 3 images: only one fits the budget at a time, so the
    others are refused (transiently) and get in after retrying."""
    retry = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, max_elapsed_s=30)
    before = refused(server)
    results, errors = [], []

    def run(k: int) -> None:
        try:
            with RewardClient(server.target, timeout_s=30, retry=retry) as client:
                group = Group("p", [np.full((SIDE, SIDE, 3), k, np.uint8)] * 3, f"c{k}")
                results.append(client.score([group])[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(r.group_id for r in results) == ["c0", "c1", "c2"]
    assert all(r.rewards == [0.5] * 3 for r in results)
    assert refused(server) - before >= 2  # refused at least twice, yet every client got its scores

    before = refused(server)
    with RewardClient(server.target, timeout_s=30, retry=retry) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.score([Group("p", [np.zeros((SIDE, SIDE, 3), np.uint8)] * 4)])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused(server) - before == 1  # refused once: no retry of a request that can never fit


@pytest.mark.slow
def test_a_stream_refused_for_a_moment_carries_on(server, stub):
    """A stream message refused transiently ends the stream (RESOURCE_EXHAUSTED with the hint);
    score_stream opens it again and every group is answered once, in order."""
    retry = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, max_elapsed_s=30)
    before = refused(server)
    hold = stub.Score.future(request(3), timeout=30)
    deadline = time.monotonic() + 10
    while metric(server, "advgrpo_inflight_decoded_bytes") < 3 * PER_IMAGE:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with RewardClient(server.target, timeout_s=30, retry=retry) as client:
        groups = [Group("p", [np.zeros((SIDE, SIDE, 3), np.uint8)] * 3, f"s{i}") for i in range(3)]
        out = list(client.score_stream(iter(groups)))
    assert [s.group_id for s in out] == ["s0", "s1", "s2"]
    assert len(hold.result().groups) == 1
    assert refused(server) > before  # the stream really was refused on the way
