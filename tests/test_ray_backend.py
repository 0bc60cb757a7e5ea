"""``--backend ray`` on a local Ray (started by the server): versions reach every scoring replica,
``min_versions`` waits or fails, no response mixes versions, two deployments combine, Serve's
backpressure is RESOURCE_EXHAUSTED with a hint, and killed replicas and a killed discriminator
owner come back without losing an acknowledged update.

The contract tests (every RPC, bad input, health, reflection) run on this backend too, in
tests/test_server_grpc.py."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

pytest.importorskip("ray", reason="the Ray backend needs advgrpo-reward-server[ray]")

from advgrpo.client import Group, RewardClient
from advgrpo.common.process import ServerProcess
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc
from advgrpo.reward_server.state import StateStore

from .conftest import noise_image, smooth_image

pytestmark = pytest.mark.slow

WAIT_S = 3.0  # server.min_version_wait_s here
SLOW_MS = 400  # the "slow" deployment's model call

CONFIG = f"""
server:
  min_version_wait_s: {WAIT_S}
models:
  ocr: null               # not needed here: replicas start sooner
  dino_similarity: null
  slow: {{kind: noop, params: {{value: 0.5, delay_ms: {SLOW_MS}}}, batching: {{max_delay_ms: 0}}}}
ray:
  sync_poll_s: 1.0
  deployments:
    rewards: {{models: [dino, pickscore]}}
    slow: {{models: [slow], num_replicas: 1, max_ongoing_requests: 1, max_queued_requests: 1, num_cpus: 0.5}}
"""


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-state")


@pytest.fixture(scope="module")
def server(tmp_path_factory, state_dir):
    cfg = tmp_path_factory.mktemp("ray-config") / "ray.yaml"
    cfg.write_text(CONFIG)
    args = ["--preset", "tiny", "--config", str(cfg), "--state-dir", str(state_dir)]
    proc = ServerProcess([*args, "--backend", "ray", "--replicas", "2"], timeout_s=300)
    yield proc
    proc.stop(60)


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.target, timeout_s=60) as c:
        c.wait_ready(60)
        yield c


def ray_status(server) -> dict:
    return httpx.get(f"{server.http}/v1/stats", timeout=10).json()["ray"]


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def scoring_replicas(server) -> dict[str, dict]:
    return {rid: r for rid, r in ray_status(server)["replicas"].items() if r["deployment"] == "rewards"}


def update(client, seed: int, model: str = "dino", **kw):
    rng = np.random.default_rng(seed)
    refs = [Group("a cat", [smooth_image(rng, 32) for _ in range(2)])]
    gens = [Group("a cat", [noise_image(rng, 32) for _ in range(2)])]
    return client.update_discriminator(model, refs, gens, **kw)


def probe(seed: int = 0, groups: int = 1) -> list[Group]:
    rng = np.random.default_rng(seed)
    return [Group(f"p{i}", [smooth_image(rng, 32), noise_image(rng, 32)], f"g{i}") for i in range(groups)]


def dino_version(client) -> int:
    return {m.name: m.version for m in client.list_models()}["dino"]


def test_two_scoring_replicas_each_serve_every_acknowledged_version(server, client):
    wait_for(lambda: len(scoring_replicas(server)) == 2, 30, "both scoring replicas report to the owner")
    for seed in range(3):
        version = update(client, seed).version
        # Every replica reports the new version (they follow the owner through a long poll).
        wait_for(
            lambda v=version: all(r["versions"]["dino"] == v for r in scoring_replicas(server).values()),
            10,
            f"every replica at version {version}",
        )
        scored = [client.score(probe(k), {"dino": 1.0})[0] for k in range(6)]
        assert {s.model_versions["dino"] for s in scored} == {version}
    assert dino_version(client) == version
    # The replicas score alike: the same probe gives the same reward on whichever answers.
    rewards = {tuple(client.score(probe(0), {"dino": 1.0})[0].rewards) for _ in range(8)}
    assert len(rewards) == 1


def test_a_version_no_replica_has_yet_waits_for_the_update(server, client):
    version = dino_version(client)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(client.score, probe(1), {"dino": 1.0}, {"dino": version + 1})
        time.sleep(1.0)
        assert not waiting.done()  # no replica has version + 1: the call waits for it
        acked = update(client, 10).version
        assert acked == version + 1
        scored = waiting.result(timeout=30)
    assert scored[0].model_versions["dino"] == version + 1


def test_a_version_that_never_comes_fails_with_failed_precondition(server, client):
    version = dino_version(client)
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(server.target))
    request = reward_pb2.ScoreRequest(
        groups=[reward_pb2.ImageGroup(prompt="a", images=[raw_image(8, 8)])],
        weights={"dino": 1.0},
        min_versions={"dino": version + 5},
    )
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=60)
    elapsed = time.monotonic() - t0
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    details = info.value.details()
    assert "dino" in details and str(version + 5) in details and str(version) in details
    assert WAIT_S - 0.5 <= elapsed < WAIT_S + 10
    # An unknown model is NOT_FOUND at the ingress, before any replica is asked.
    request.min_versions.clear()
    request.min_versions["nope"] = 1
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()
    assert len(client.score(probe(2), {"dino": 1.0})[0].rewards) == 2  # still serving


def raw_image(h: int, w: int) -> reward_pb2.Image:
    return reward_pb2.Image(encoding=reward_pb2.ENCODING_RAW_RGB8, height=h, width=w, data=bytes(h * w * 3))


def test_no_response_mixes_versions_while_updates_land(server, client):
    stop = threading.Event()
    responses: list[list] = []
    errors: list[BaseException] = []

    def score_loop(seed: int) -> None:
        with RewardClient(server.target, timeout_s=60) as c:
            k = 0
            while not stop.is_set():
                try:
                    responses.append(c.score(probe(seed + k, groups=4), {"dino": 1.0, "pickscore": 0.5}))
                    responses.append(list(c.score_stream(iter(probe(seed + k + 1, groups=3)), {"dino": 1.0})))
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return
                k += 2

    threads = [threading.Thread(target=score_loop, args=(100 * i,)) for i in range(3)]
    for t in threads:
        t.start()
    first = dino_version(client)
    for seed in range(5):
        update(client, 20 + seed)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    unary = [r for r in responses if len(r) == 4]
    assert unary and len(responses) >= 6
    for response in unary:
        assert len({g.model_versions["dino"] for g in response}) == 1, [g.model_versions for g in response]
        assert len({g.model_versions["pickscore"] for g in response}) == 1
    seen = {g.model_versions["dino"] for r in responses for g in r}
    assert min(seen) >= first and max(seen) <= first + 5


def test_concurrent_updates_publish_every_version_and_never_go_back(server, client):
    """Updates of one model from several clients at once: each acknowledged version is served
    (a publish that finishes late never replaces a newer one)."""
    before = dino_version(client)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        acked = sorted(pool.map(lambda k: update(client, 60 + k).version, range(9)))
    assert acked == list(range(before + 1, before + 10))
    last = acked[-1]
    wait_for(
        lambda: all(r["versions"]["dino"] == last for r in scoring_replicas(server).values()),
        15,
        f"every replica at version {last}",
    )
    assert ray_status(server)["owner"]["versions"]["dino"] == last
    scored = client.score(probe(6), {"dino": 1.0}, {"dino": last})
    assert scored[0].model_versions["dino"] == last


def test_min_versions_of_a_model_that_does_not_score_the_request_still_holds(server, client):
    """A request scored by the "slow" deployment alone, naming dino's version: met at once when
    acknowledged, FAILED_PRECONDITION after the wait when the owner never gets there."""
    version = dino_version(client)
    assert client.score(probe(5), {"slow": 1.0}, {"dino": version})[0].components["slow"] == [0.5, 0.5]
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        client.score(probe(5), {"slow": 1.0}, {"dino": version + 3})
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "dino" in info.value.details() and str(version + 3) in info.value.details()
    assert time.monotonic() - t0 >= WAIT_S - 0.5


def test_a_request_across_two_deployments_combines_their_components(server, client):
    groups = probe(3, groups=2)
    both = client.score(groups, {"dino": 2.0, "slow": 0.5})
    dino = client.score(groups, {"dino": 1.0})
    for g, d in zip(both, dino, strict=True):
        assert g.components["slow"] == [0.5, 0.5]
        assert g.components["dino"] == d.components["dino"]
        expected = (2.0 * np.asarray(d.components["dino"], np.float64) + 0.25).astype(np.float32)
        assert g.rewards == expected.tolist()
        assert set(g.model_versions) == {"dino", "slow"}


def test_full_replica_queues_are_resource_exhausted_with_a_retry_hint(server, client):
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(server.target))
    request = reward_pb2.ScoreRequest(
        groups=[reward_pb2.ImageGroup(prompt="a", images=[raw_image(4, 4)])], weights={"slow": 1.0}
    )

    def call():
        try:
            stub.Score(request, timeout=60)
            return "OK", None
        except grpc.RpcError as exc:
            return exc.code().name, dict(exc.trailing_metadata() or ())

    # "slow": one replica taking one request at a time, one more queued at the ingress.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: call(), range(8)))
    codes = [c for c, _ in outcomes]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes.count("OK") >= 1
    assert "RESOURCE_EXHAUSTED" in codes, codes
    for code, trailer in outcomes:
        if code == "RESOURCE_EXHAUSTED":
            assert int(trailer["grpc-retry-pushback-ms"]) > 0  # transient: retry after the hint
    # Our client retries those on its own: every call ends with a score.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        scores = list(pool.map(lambda _: client.score(probe(4), {"slow": 1.0}), range(4)))
    assert all(s[0].components["slow"] == [0.5, 0.5] for s in scores)


def test_a_killed_scoring_replica_comes_back_at_the_current_version(server, client):
    version = update(client, 30).version
    replicas = wait_for(
        lambda: (
            r
            if len(r := scoring_replicas(server)) == 2 and all(x["versions"]["dino"] == version for x in r.values())
            else None
        ),
        15,
        "two replicas at the current version",
    )
    victim, report = next(iter(replicas.items()))
    os.kill(report["pid"], signal.SIGKILL)
    # Scores go on meanwhile (the other replica; a call that was on the victim is retried).
    for k in range(4):
        assert client.score(probe(k), {"dino": 1.0})[0].model_versions["dino"] == version

    def replaced():
        now = scoring_replicas(server)
        fresh = [r for rid, r in now.items() if rid != victim and rid not in replicas]
        return fresh if fresh and all(r["versions"]["dino"] == version for r in fresh) else None

    # Serve starts a new replica; before it takes requests it fetches the owner's current version.
    (fresh,) = wait_for(replaced, 120, "a new replica at the current version", poll_s=0.5)
    assert fresh["pid"] != report["pid"]
    assert client.score(probe(0), {"dino": 1.0})[0].model_versions["dino"] == version


def test_a_killed_owner_restarts_from_the_durable_state_and_loses_no_update(server, client, state_dir):
    acknowledged = [update(client, 40 + k).version for k in range(3)]
    owner_pid = ray_status(server)["owner"]["pid"]
    os.kill(owner_pid, signal.SIGKILL)
    # The next update waits out the restart (UNAVAILABLE is retried by the client) and lands on
    # top of every acknowledged one.
    with RewardClient(server.target, timeout_s=120) as patient:
        after = update(patient, 50)
    assert after.version == acknowledged[-1] + 1
    assert ray_status(server)["owner"]["pid"] != owner_pid
    _, meta = StateStore(state_dir).load("dino")
    assert int(meta["version"]) == after.version
    # The replicas follow the restarted owner.
    wait_for(
        lambda: all(r["versions"]["dino"] == after.version for r in scoring_replicas(server).values()),
        30,
        "replicas at the owner's version after its restart",
    )
    assert client.score(probe(0), {"dino": 1.0})[0].model_versions["dino"] == after.version
