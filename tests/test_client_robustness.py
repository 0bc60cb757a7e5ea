"""The client's failure modes: a stream the server never answers, a caller whose group iterator
raises, updates larger than the message limit, and groups with more images than a request may
carry. (Retries: tests/test_client.py.)"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from advgrpo.client import Group, RewardClient
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

from .conftest import noise_image, smooth_image


class FakeService(reward_pb2_grpc.RewardServiceServicer):
    """Answers ScoreStream messages after ``delay_s`` each (every reward = the image count of
    its group), or, with ``hang``, never answers anything (nor ends a stream) until the test ends."""

    def __init__(self, delay_s: float = 0.0, hang: bool = False):
        self.delay_s, self.hang = delay_s, hang
        self.released = threading.Event()
        self.messages = 0

    def Score(self, request, context):
        self.released.wait(60)
        context.abort(grpc.StatusCode.UNAVAILABLE, "test over")

    def ScoreStream(self, request_iterator, context):
        for request in request_iterator:
            self.messages += 1
            if self.hang:
                self.released.wait(60)
                return
            time.sleep(self.delay_s)
            yield reward_pb2.ScoreResponse(
                groups=[
                    reward_pb2.GroupScores(group_id=g.group_id, rewards=[float(len(g.images))] * len(g.images))
                    for g in request.groups
                ]
            )
        if self.hang:
            self.released.wait(60)


@pytest.fixture
def fake_server(in_process_server):
    """Factory: fake_server(service) -> target; servers stop (and hanging handlers return) after the test."""
    return lambda service: in_process_server(
        lambda server: reward_pb2_grpc.add_RewardServiceServicer_to_server(service, server), service.released.set
    )


def run_bounded(fn, limit_s: float):
    """``fn()`` in a thread: (its result or exception, seconds taken); fails the test if it is
    still running after ``limit_s`` (the old client blocked forever here)."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still blocked after {limit_s}s"
    return out.get("error", out.get("value")), time.monotonic() - t0


# ---------------------------------------------------------------- score_stream deadline


@pytest.mark.parametrize("shared_memory", [False, True])
def test_score_stream_fails_with_deadline_exceeded_when_the_server_never_answers(fake_server, shared_memory):
    service = FakeService(hang=True)
    client = RewardClient(fake_server(service), timeout_s=0.5, shared_memory=shared_memory)
    image = np.zeros((8, 8, 3), np.uint8)
    try:
        error, took = run_bounded(lambda: list(client.score_stream([Group("p", [image])] * 3)), 10)
        assert isinstance(error, grpc.RpcError), error
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "unanswered" in error.details()
        assert 0.5 <= took < 5
        if shared_memory:  # the unanswered messages' segments were dropped, none is still out
            assert client._stream_slots._out == 0
        # A stream whose every message was answered (here: none sent) still needs its end.
        error, took = run_bounded(lambda: list(client.score_stream([])), 10)
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    finally:
        client.close()


def test_score_stream_may_outlast_timeout_s_while_the_server_keeps_answering(fake_server):
    """The deadline is per unanswered message, not per stream; and a caller that takes its time
    between answers does not make the server look silent."""
    client = RewardClient(fake_server(FakeService(delay_s=0.15)), timeout_s=0.6)
    image = np.zeros((4, 4, 3), np.uint8)

    def groups():
        for i in range(8):
            yield Group("p", [image] * (i % 3 + 1), f"g{i}")

    try:
        t0 = time.monotonic()
        out = []
        for score in client.score_stream(groups()):
            out.append(score)
            if len(out) == 2:
                time.sleep(1.0)  # the caller is busy: answers keep arriving meanwhile
        assert time.monotonic() - t0 > 1.2  # longer than timeout_s in all
        assert [s.group_id for s in out] == [f"g{i}" for i in range(8)]
        assert [s.rewards for s in out] == [[float(i % 3 + 1)] * (i % 3 + 1) for i in range(8)]
    finally:
        client.close()


# ---------------------------------------------------------------- the caller's exceptions


class DecoderFailed(Exception):
    pass


@pytest.fixture(scope="module")
def brightness_server(tmp_path_factory):
    from advgrpo.common.process import ServerProcess

    cfg = tmp_path_factory.mktemp("cfg") / "brightness.yaml"
    cfg.write_text("models:\n  brightness: {kind: brightness, weight: 1.0}\n")
    server = ServerProcess(["--config", str(cfg)], http=False)
    yield server
    server.stop()


@pytest.mark.slow
def test_score_stream_raises_the_callers_exception_after_the_groups_before_it(brightness_server):
    image = np.full((8, 8, 3), 255, np.uint8)

    def groups():
        yield Group("p", [image], "first")
        yield Group("p", [image, image], "second")
        raise DecoderFailed("the sampler blew up")

    got = []
    with RewardClient(brightness_server.target, timeout_s=30) as client:
        with pytest.raises(DecoderFailed, match="blew up"):
            for score in client.score_stream(groups()):
                got.append(score)
        assert [s.group_id for s in got] == ["first", "second"]
        assert [len(s.rewards) for s in got] == [1, 2]

        # An image that cannot be encoded (it is encoded on grpc's request thread) likewise.
        bad = [Group("p", [image], "ok"), Group("p", [np.zeros((2, 2, 2, 2), np.uint8)], "bad")]
        with pytest.raises(ValueError, match="dimensions"):
            list(client.score_stream(bad))
        assert len(client.score([Group("p", [image])])[0].rewards) == 1  # still usable


@pytest.mark.slow
def test_score_splits_a_group_with_more_images_than_a_request_may_carry(brightness_server):
    image = np.full((4, 4, 3), 255, np.uint8)
    with RewardClient(brightness_server.target, timeout_s=30) as client:  # the server's limit: 1024
        (out,) = client.score([Group("p", [image] * 1100)])
        assert len(out.rewards) == 1100 and len(set(out.rewards)) == 1
        (streamed,) = client.score_stream([Group("p", [image] * 1100)])
        assert streamed.rewards == out.rewards


# ---------------------------------------------------------------- update larger than a message

DINO = (
    "models:\n  dino: {kind: dino, weight: 1.0, params: {backbone: tiny, image_size: 56, "
    "head_hidden: 64, num_patches: 8, lr: 0.03}}\n"
)
LIMIT = 60_000  # bytes; 8 raw 64x64 images are 98 KB


@pytest.mark.slow
def test_update_too_big_for_a_message_goes_as_png_with_the_same_result(start_server, tmp_path):
    cfg = tmp_path / "dino.yaml"
    cfg.write_text(DINO)
    rng = np.random.default_rng(3)
    refs = [Group("ref", [smooth_image(rng) for _ in range(4)])]
    gens = [Group("gen", [smooth_image(rng) for _ in range(4)])]
    probe = [Group("probe", [smooth_image(rng) for _ in range(3)])]
    wide = start_server("--config", str(cfg), "--no-http")
    narrow = start_server("--config", str(cfg), "--no-http", "--max-message-bytes", str(LIMIT))
    with (
        RewardClient(wide.target, timeout_s=60) as raw,
        RewardClient(narrow.target, timeout_s=60, max_message_bytes=LIMIT) as small,
    ):
        expected = raw.update_discriminator("dino", refs, gens, update_id="u1")
        got = small.update_discriminator("dino", refs, gens, update_id="u1")
        assert got == expected and got.version == 1
        assert small.score(probe, {"dino": 1.0})[0].rewards == raw.score(probe, {"dino": 1.0})[0].rewards

        # Noise does not compress: too large even as PNG, refused before any call.
        noisy = [Group("gen", [noise_image(rng) for _ in range(8)])]

        def no_call(*args, **kwargs):
            raise AssertionError("an update that cannot fit was sent")

        small._update = no_call
        with pytest.raises(ValueError, match=rf"over the message limit of {LIMIT} bytes.*shared memory"):
            small.update_discriminator("dino", refs, noisy)
        assert [m.version for m in small.list_models()] == [1]
