"""How the client divides a payload into Score calls, against real servers on loopback: concurrent
calls for big payloads, failures, and split groups that straddle a discriminator update."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from advgrpo.client import Group, RewardClient

from .conftest import noise_image, smooth_image

pytestmark = pytest.mark.slow


class RecordingCall:
    """Wraps a client's Score multicallable: logs when each call starts and when its result is
    taken, and can run a hook after a given call completes."""

    def __init__(self, inner, after_call=None):
        self.inner = inner
        self.events: list[tuple[str, int]] = []
        self.after_call = after_call or {}
        self.calls = 0

    def _next(self) -> int:
        self.calls += 1
        return self.calls - 1

    def __call__(self, request, **kw):
        k = self._next()
        self.events.append(("start", k))
        response = self.inner(request, **kw)
        self.events.append(("result", k))
        if k in self.after_call:
            self.after_call[k]()
        return response

    def future(self, request, **kw):
        k = self._next()
        self.events.append(("start", k))
        future, events = self.inner.future(request, **kw), self.events

        class Recorded:
            def result(self):
                response = future.result()
                events.append(("result", k))
                return response

            def cancel(self):
                return future.cancel()

        return Recorded()


@pytest.fixture(scope="module")
def brightness_server(tmp_path_factory):
    from advgrpo.common.process import ServerProcess

    cfg = tmp_path_factory.mktemp("cfg") / "brightness.yaml"
    cfg.write_text("models:\n  brightness: {kind: brightness, weight: 1.0}\n")
    server = ServerProcess(["--config", str(cfg)])
    yield server
    server.stop()


def score_calls(server) -> float:
    from bench.common import scrape_metrics

    return scrape_metrics(server.http).get('advgrpo_rpc_requests_total{code="OK",method="Score"}', 0.0)


def test_big_payload_goes_as_concurrent_calls_with_the_same_rewards(brightness_server):
    rng = np.random.default_rng(0)
    groups = [Group(f"p{i}", [noise_image(rng, 64) for _ in range(6)]) for i in range(2)]  # 12 x 12 KiB
    with RewardClient(brightness_server.target, parallel_calls=1) as one:
        before = score_calls(brightness_server)
        whole = one.score(groups)
        assert score_calls(brightness_server) - before == 1
    with RewardClient(brightness_server.target, parallel_calls=3, min_call_bytes=30_000) as many:
        many._score = recorder = RecordingCall(many._score)
        before = score_calls(brightness_server)
        divided = many.score(groups)
        assert score_calls(brightness_server) - before == 3
    assert [g.rewards for g in divided] == [g.rewards for g in whole]
    assert [g.group_id for g in divided] == ["0", "1"]
    # All three were in flight before the first answer was taken.
    assert recorder.events[:4] == [("start", 0), ("start", 1), ("start", 2), ("result", 0)]
    assert all(len(g.rewards) == 6 for g in divided)


def test_in_flight_calls_are_bounded_by_parallel_calls(brightness_server):
    rng = np.random.default_rng(1)
    group = Group("p", [noise_image(rng, 64) for _ in range(12)])
    with RewardClient(
        brightness_server.target, parallel_calls=2, min_call_bytes=12_000, max_message_bytes=40_000
    ) as client:
        client._score = recorder = RecordingCall(client._score)
        out = client.score([group])
    assert len(out[0].rewards) == 12
    in_flight = peak = 0
    for kind, _ in recorder.events:
        in_flight += 1 if kind == "start" else -1
        peak = max(peak, in_flight)
    assert recorder.calls > 2 and peak == 2


def test_a_failing_call_among_concurrent_ones_is_raised(brightness_server):
    rng = np.random.default_rng(2)
    group = Group("p", [noise_image(rng, 64) for _ in range(8)])
    with RewardClient(brightness_server.target, parallel_calls=4, min_call_bytes=20_000) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.score([group], {"no-such-model": 1.0})
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(client.score([group])[0].rewards) == 8  # the client is still usable


def test_split_group_straddling_an_update_is_scored_again(tiny_server):
    rng = np.random.default_rng(5)
    refs = [Group("ref", [smooth_image(rng) for _ in range(4)])]
    gens = [Group("gen", [noise_image(rng) for _ in range(4)])]
    group = Group("p", [noise_image(rng) for _ in range(6)], "straddler")  # 12 KiB per image
    with (
        RewardClient(tiny_server.target, timeout_s=60) as updater,
        RewardClient(tiny_server.target, timeout_s=60, max_message_bytes=30_000, parallel_calls=1) as client,
    ):
        updater.wait_ready(60)
        before = updater.score([group], {"dino": 1.0})[0]

        def update() -> None:
            updater.update_discriminator("dino", refs, gens)

        client._score = recorder = RecordingCall(client._score, after_call={0: update})
        out = client.score([group], {"dino": 1.0})[0]
        after = updater.score([group], {"dino": 1.0})[0]

        parts = recorder.calls // 2
        assert parts >= 2 and recorder.calls == 2 * parts  # the whole group went a second time
        assert after.model_versions["dino"] == before.model_versions["dino"] + 1
        assert out.model_versions == after.model_versions and out.rewards == after.rewards
        assert out.rewards != before.rewards

        client._score = RecordingCall(recorder.inner, after_call={0: update})
        client.max_rescores = 0
        with pytest.raises(RuntimeError, match="different model versions"):
            client.score([group], {"dino": 1.0})
