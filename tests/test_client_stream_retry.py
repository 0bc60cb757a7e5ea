"""``score_stream`` survives a stream that fails with UNAVAILABLE (a restarted server, a dropped
connection): it opens a new stream, sends the unanswered messages again, and yields every group
exactly once, in order. Other statuses, and an exhausted retry budget, still raise."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from advgrpo.client import Group, RetryPolicy, RewardClient
from advgrpo.common.process import ServerProcess
from advgrpo.common.protocol import STREAM_OPEN_KEY
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

from .test_client import free_port

FAST_RETRY = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, max_elapsed_s=10)


class FlakyStreamService(reward_pb2_grpc.RewardServiceServicer):
    """Each ScoreStream call records the group ids it receives. Call ``k`` (from 0) answers
    ``answers[k]`` messages, then aborts with ``codes[k]``; calls past the lists answer everything.
    A call in ``up_for_s`` first accepts the stream as our server does (its STREAM_OPEN_KEY
    header) and stays up that long before reading anything. Every reward is the image count of
    its group."""

    def __init__(self, answers: list[int], codes: list[grpc.StatusCode], up_for_s: dict[int, float] | None = None):
        self.answers, self.codes, self.up_for_s = answers, codes, up_for_s or {}
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def ScoreStream(self, request_iterator, context):
        with self.lock:
            k = len(self.calls)
            received: list[str] = []
            self.calls.append(received)
        if k in self.up_for_s:
            context.send_initial_metadata(((STREAM_OPEN_KEY, "1"),))
            time.sleep(self.up_for_s[k])
        for answered, request in enumerate(request_iterator):
            received.extend(g.group_id for g in request.groups)
            if k < len(self.answers) and answered >= self.answers[k]:
                context.abort(self.codes[k], f"call {k} fails after {self.answers[k]} answers")
            yield reward_pb2.ScoreResponse(
                groups=[
                    reward_pb2.GroupScores(group_id=g.group_id, rewards=[float(len(g.images))] * len(g.images))
                    for g in request.groups
                ]
            )
        if k < len(self.answers):
            context.abort(self.codes[k], f"call {k} fails at its end")


@pytest.fixture
def flaky(in_process_server):
    """Factory: flaky(service) -> target; the servers stop after the test."""
    return lambda service: in_process_server(
        lambda server: reward_pb2_grpc.add_RewardServiceServicer_to_server(service, server)
    )


def numbered_groups(n: int):
    image = np.zeros((4, 4, 3), np.uint8)
    return [Group("p", [image] * (i % 3 + 1), f"g{i}") for i in range(n)]


@pytest.mark.parametrize("shared_memory", [False, True])
def test_a_failed_stream_is_opened_again_and_the_unanswered_messages_resent(flaky, shared_memory):
    unavailable = grpc.StatusCode.UNAVAILABLE
    service = FlakyStreamService(answers=[3, 0], codes=[unavailable, unavailable])
    client = RewardClient(flaky(service), timeout_s=10, retry=FAST_RETRY, shared_memory=shared_memory)
    try:
        out = list(client.score_stream(iter(numbered_groups(10))))
        assert [s.group_id for s in out] == [f"g{i}" for i in range(10)]  # each once, in order
        assert [s.rewards for s in out] == [[float(i % 3 + 1)] * (i % 3 + 1) for i in range(10)]
        assert len(service.calls) == 3
        first, second, third = service.calls
        assert first[:4] == ["g0", "g1", "g2", "g3"]  # g3 was received, never answered
        assert second[:1] == ["g3"]  # the failed calls' unanswered messages go first, in order
        assert third == [f"g{i}" for i in range(3, 10)]  # answered: nothing before g3 again
        if shared_memory:  # segments of the failed calls were dropped, the rest returned
            assert client._stream_slots._out == 0
    finally:
        client.close()


def test_a_group_split_over_messages_is_resent_from_its_unanswered_part(flaky):
    service = FlakyStreamService(answers=[2], codes=[grpc.StatusCode.UNAVAILABLE])
    image = np.zeros((32, 32, 3), np.uint8)  # 3 KB; a message may carry 2 images
    client = RewardClient(flaky(service), timeout_s=10, retry=FAST_RETRY, max_images_per_call=2)
    try:
        (out,) = client.score_stream([Group("p", [image] * 7, "big")])
        # Parts of 2, 2, 2, 1 images: 2 answered on the first call, the other 2 on the second.
        assert out.group_id == "big" and out.rewards == [2.0] * 6 + [1.0]
        assert len(service.calls) == 2 and len(service.calls[1]) == 2
    finally:
        client.close()


def test_other_statuses_are_raised_without_a_retry(flaky):
    service = FlakyStreamService(answers=[2], codes=[grpc.StatusCode.INVALID_ARGUMENT])
    client = RewardClient(flaky(service), timeout_s=10, retry=FAST_RETRY)
    got = []
    try:
        with pytest.raises(grpc.RpcError) as info:
            for score in client.score_stream(iter(numbered_groups(6))):
                got.append(score.group_id)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert got == ["g0", "g1"] and len(service.calls) == 1
    finally:
        client.close()


def test_a_stream_that_keeps_failing_raises_once_the_attempts_are_spent(flaky):
    codes = [grpc.StatusCode.UNAVAILABLE] * 10
    service = FlakyStreamService(answers=[0] * 10, codes=codes)
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    client = RewardClient(flaky(service), timeout_s=10, retry=retry)
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(client.score_stream(iter(numbered_groups(4))))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(service.calls) == 3
        assert all(call[:1] == ["g0"] for call in service.calls)
    finally:
        client.close()


def test_a_stream_that_was_up_and_then_failed_is_a_new_outage(flaky):
    """The first stream fails at once and starts an outage with a 1 s budget; the second is
    accepted (the server is up again) and fails 1.5 s later without answering anything, as when
    the server restarts while the caller is still sampling. That is a new outage: retried, where
    counting it against the first one's spent budget gave up."""
    unavailable = grpc.StatusCode.UNAVAILABLE
    service = FlakyStreamService(answers=[0, 0], codes=[unavailable, unavailable], up_for_s={1: 1.5})
    retry = RetryPolicy(max_elapsed_s=1.0, initial_backoff_s=0.01, max_backoff_s=0.05)
    client = RewardClient(flaky(service), timeout_s=10, retry=retry)
    try:
        out = list(client.score_stream(iter(numbered_groups(3))))
        assert [s.group_id for s in out] == ["g0", "g1", "g2"]
        assert len(service.calls) == 3
    finally:
        client.close()


def test_a_stream_never_accepted_gives_up_within_its_budget(flaky):
    """Streams that fail before the server accepts them (never up) stay one outage: the time
    budget ends the retries."""
    codes = [grpc.StatusCode.UNAVAILABLE] * 1000
    service = FlakyStreamService(answers=[0] * 1000, codes=codes)
    retry = RetryPolicy(max_elapsed_s=0.5, initial_backoff_s=0.01, max_backoff_s=0.05)
    client = RewardClient(flaky(service), timeout_s=10, retry=retry)
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(client.score_stream(iter(numbered_groups(2))))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 0.5 <= time.monotonic() - t0 < 5 and len(service.calls) > 3
    finally:
        client.close()


def test_an_answer_on_the_new_stream_gives_a_fresh_retry_budget(flaky):
    """Two separate outages, each within max_attempts=2, do not add up to a failure."""
    unavailable = grpc.StatusCode.UNAVAILABLE
    service = FlakyStreamService(answers=[2, 2], codes=[unavailable, unavailable])
    retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)
    client = RewardClient(flaky(service), timeout_s=10, retry=retry)
    try:
        out = list(client.score_stream(iter(numbered_groups(7))))
        assert [s.group_id for s in out] == [f"g{i}" for i in range(7)]
        assert len(service.calls) == 3
    finally:
        client.close()


@pytest.mark.slow
def test_score_stream_outlives_a_killed_and_restarted_server(tmp_path):
    """A real server process is SIGKILLed in the middle of a stream and a new one started on the
    same port; the stream carries on, and every group's reward (its brightness) is right."""
    cfg = tmp_path / "brightness.yaml"
    cfg.write_text("models:\n  brightness: {kind: brightness, weight: 1.0}\n")
    port = free_port()
    args = ["--config", str(cfg), "--port", str(port)]
    servers = [ServerProcess(args, http=False)]
    levels = [10 * i for i in range(16)]

    def groups():
        for i, level in enumerate(levels):
            yield Group("p", [np.full((8, 8, 3), level, np.uint8)] * 2, f"g{i}")
            time.sleep(0.05)  # a sampler's pace: messages are in flight when the server dies

    client = RewardClient(
        servers[0].target, timeout_s=30, retry=RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, max_elapsed_s=60)
    )
    out = []
    try:
        # The server accepts a stream at once, before anything is sent on it.
        with grpc.insecure_channel(servers[0].target) as channel:
            idle = threading.Event()
            call = reward_pb2_grpc.RewardServiceStub(channel).ScoreStream(iter(idle.wait, True), timeout=30)
            assert (STREAM_OPEN_KEY, "1") in call.initial_metadata()
            idle.set()
            call.cancel()
        for score in client.score_stream(groups()):
            out.append(score)
            if len(out) == 4:
                servers[0].kill()  # SIGKILL
                servers.append(ServerProcess(args, http=False))
        assert [s.group_id for s in out] == [f"g{i}" for i in range(16)]
        want = client.score([Group("p", [np.full((8, 8, 3), level, np.uint8)] * 2) for level in levels])
        assert [s.rewards for s in out] == [w.rewards for w in want]
        assert len({s.rewards[0] for s in out}) == 16  # the rewards tell the groups apart
    finally:
        client.close()
        for server in servers:
            server.stop()
