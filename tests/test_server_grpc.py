"""The reward server over real gRPC on loopback: every RPC, health, reflection, bad inputs.

The tests on the shared tiny server run against both backends: the single process, and Ray
Serve (``--backend ray --replicas 2``: an ingress, two scoring replicas and the discriminator
owner on a local Ray started by the server)."""

from __future__ import annotations

import concurrent.futures
import io

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image as PILImage

from advgrpo.client import Group, RewardClient
from advgrpo.common.process import ServerProcess
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

from .conftest import noise_image, smooth_image

pytestmark = pytest.mark.slow
SERVICE = "advgrpo.reward.v1.RewardService"


@pytest.fixture(scope="module", params=["single", "ray"])
def tiny_server(request, tmp_path_factory):
    """The tiny preset with a state dir, on each backend (this module's contract tests run on both)."""
    args = ["--preset", "tiny", "--state-dir", str(tmp_path_factory.mktemp("state"))]
    if request.param == "ray":
        pytest.importorskip("ray", reason="the Ray backend needs advgrpo-reward-server[ray]")
        args += ["--backend", "ray", "--replicas", "2"]
    server = ServerProcess(args, timeout_s=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tiny_server):
    with RewardClient(tiny_server.target, timeout_s=60) as c:
        c.wait_ready(60)
        yield c


@pytest.fixture(scope="module")
def stub(tiny_server):
    channel = grpc.insecure_channel(tiny_server.target, options=[("grpc.max_send_message_length", 128 << 20)])
    yield reward_pb2_grpc.RewardServiceStub(channel)
    channel.close()


def raw(h: int, w: int, data: bytes | None = None) -> reward_pb2.Image:
    return reward_pb2.Image(
        encoding=reward_pb2.ENCODING_RAW_RGB8, height=h, width=w, data=data if data is not None else bytes(h * w * 3)
    )


def score_request(*images: reward_pb2.Image, prompt: str = "a cat", weights=None) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        groups=[reward_pb2.ImageGroup(group_id="g0", prompt=prompt, images=list(images))], weights=weights or {}
    )


def expect_status(call, request, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


# ---------------------------------------------------------------- round trips


def test_list_models(client):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"dino", "pickscore", "ocr", "dino_similarity"}
    assert models["dino"].trainable and models["pickscore"].trainable and not models["ocr"].trainable
    sim = models["dino_similarity"]
    assert sim.kind == "dino_similarity" and not sim.trainable and sim.default_weight == 0.0
    assert models["dino"].kind == "dino" and models["dino"].default_weight == 1.0


def test_score_roundtrip_all_encodings_and_weights(client):
    rng = np.random.default_rng(0)
    imgs = [smooth_image(rng), noise_image(rng), smooth_image(rng, 48)]
    weights = {"dino": 0.5, "pickscore": 2.0}
    results = {}
    for enc in ("raw", "png"):
        c = RewardClient(client.target, encoding=enc)
        results[enc] = c.score([Group("a cat", imgs, "cats"), Group("a dog", imgs[:1])], weights)
        c.close()
    raw_res, png_res = results["raw"], results["png"]
    assert [g.group_id for g in raw_res] == ["cats", "1"]
    assert len(raw_res[0].rewards) == 3 and len(raw_res[1].rewards) == 1
    for g in raw_res:
        assert set(g.components) == {"dino", "pickscore"}
        for i, r in enumerate(g.rewards):
            expected = 0.5 * g.components["dino"][i] + 2.0 * g.components["pickscore"][i]
            assert r == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert set(g.model_versions) == {"dino", "pickscore"}
    # PNG is lossless: identical scores to raw.
    assert png_res[0].rewards == raw_res[0].rewards
    # JPEG decodes to other pixels but must work.
    c = RewardClient(client.target, encoding="jpeg")
    jpeg_res = c.score([Group("a cat", imgs)], weights)
    c.close()
    assert len(jpeg_res[0].rewards) == 3 and all(np.isfinite(jpeg_res[0].rewards))


def test_default_weights_are_the_server_spec(client):
    rng = np.random.default_rng(1)
    res = client.score([Group("x", [smooth_image(rng)])])
    assert set(res[0].components) == {"dino"}
    assert res[0].rewards == pytest.approx(res[0].components["dino"])


def test_score_stream_one_response_per_request_in_order(client):
    rng = np.random.default_rng(2)
    groups = [Group(f"p{i}", [noise_image(rng) for _ in range(1 + i % 3)], f"g{i}") for i in range(7)]
    streamed = list(client.score_stream(iter(groups), {"dino": 1.0}))
    assert [g.group_id for g in streamed] == [f"g{i}" for i in range(7)]
    unary = client.score(groups, {"dino": 1.0})
    assert [g.rewards for g in streamed] == [g.rewards for g in unary]


def test_score_stream_raw_stub_answers_each_message(stub):
    requests = [score_request(raw(8, 8), prompt=f"p{i}", weights={"dino": 1.0}) for i in range(4)]
    for i, r in enumerate(requests):
        r.groups[0].group_id = f"m{i}"
    responses = list(stub.ScoreStream(iter(requests), timeout=60))
    assert [r.groups[0].group_id for r in responses] == ["m0", "m1", "m2", "m3"]


def test_client_splits_groups_larger_than_the_message_budget(tiny_server):
    rng = np.random.default_rng(3)
    imgs = [noise_image(rng, 64) for _ in range(6)]  # 12 KiB each raw
    with RewardClient(tiny_server.target, max_message_bytes=30_000) as small:
        split = small.score([Group("p", imgs, "big")], {"dino": 1.0})
    with RewardClient(tiny_server.target) as big:
        whole = big.score([Group("p", imgs, "big")], {"dino": 1.0})
    assert split[0].rewards == whole[0].rewards and len(split[0].rewards) == 6


def test_update_version_rises_by_exactly_one(client):
    rng = np.random.default_rng(4)
    before = {m.name: m.version for m in client.list_models()}
    refs = [Group("a cat", [smooth_image(rng) for _ in range(3)])]
    gens = [Group("a cat", [noise_image(rng) for _ in range(3)])]
    r1 = client.update_discriminator("dino", refs, gens, steps=2)
    r2 = client.update_discriminator("dino", refs, gens)
    assert (r1.version, r2.version) == (before["dino"] + 1, before["dino"] + 2)
    assert r1.model == "dino" and np.isfinite(r1.loss) and 0.0 <= r1.accuracy <= 1.0
    after = {m.name: m.version for m in client.list_models()}
    assert after["dino"] == before["dino"] + 2 and after["pickscore"] == before["pickscore"]
    scored = client.score([Group("a cat", [smooth_image(rng)])], {"dino": 1.0})
    assert scored[0].model_versions["dino"] == r2.version
    p = client.update_discriminator("pickscore", refs, gens)
    assert p.version == before["pickscore"] + 1


def test_update_retry_with_same_id_is_not_applied_twice(client):
    rng = np.random.default_rng(5)
    refs, gens = [Group("a", [smooth_image(rng)])], [Group("a", [noise_image(rng)])]
    first = client.update_discriminator("dino", refs, gens, update_id="fixed-id-1")
    again = client.update_discriminator("dino", refs, gens, update_id="fixed-id-1")
    assert again.replayed and not first.replayed
    assert again.version == first.version and again.loss == first.loss


# ---------------------------------------------------------------- health & reflection


def test_health_serving_for_server_and_service(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(tiny_server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(tiny_server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {SERVICE, "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName(SERVICE)
        assert {m.name for m in svc.methods} == {
            "Score",
            "ScoreStream",
            "UpdateDiscriminator",
            "ListModels",
            "CheckSharedMemory",
        }
        enum = pool.FindEnumTypeByName("advgrpo.reward.v1.Encoding")
        assert [v.name for v in enum.values] == [
            "ENCODING_UNSPECIFIED",
            "ENCODING_RAW_RGB8",
            "ENCODING_PNG",
            "ENCODING_JPEG",
        ]


# ---------------------------------------------------------------- bad input


def test_bad_inputs_get_clear_statuses_and_the_server_keeps_serving(stub, client):
    IA = grpc.StatusCode.INVALID_ARGUMENT
    expect_status(stub.Score, score_request(raw(4, 4, b"\0" * 47)), IA, "groups[0].images[0]", "47 bytes", "48")
    bad_png = reward_pb2.Image(encoding=reward_pb2.ENCODING_PNG, data=b"\x89PNG not really")
    expect_status(stub.Score, score_request(bad_png), IA, "groups[0].images[0]", "PNG")
    bad_jpeg = reward_pb2.Image(encoding=reward_pb2.ENCODING_JPEG, data=b"\xff\xd8\xff garbage")
    expect_status(stub.Score, score_request(raw(2, 2), bad_jpeg), IA, "groups[0].images[1]", "JPEG")
    expect_status(stub.Score, score_request(raw(0, 5, b"")), IA, "groups[0].images[0]", "0x5")
    # Over a size limit: RESOURCE_EXHAUSTED, marked never to be retried (gRFC A6 pushback -1).
    RE = grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(score_request(raw(5000, 1, b"")), timeout=30)
    assert info.value.code() == RE and "exceeds the maximum side" in info.value.details()
    assert dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"] == "-1"
    # A PNG whose header claims a huge size is refused before its pixels are decoded.
    buf = io.BytesIO()
    PILImage.new("RGB", (4100, 1)).save(buf, format="PNG")
    big_png = reward_pb2.Image(encoding=reward_pb2.ENCODING_PNG, data=buf.getvalue())
    expect_status(stub.Score, score_request(big_png), RE, "4100")
    unspecified = reward_pb2.Image(height=1, width=1, data=b"abc")
    expect_status(stub.Score, score_request(unspecified), IA, "encoding")
    expect_status(stub.Score, score_request(), IA, "empty group")
    expect_status(stub.Score, reward_pb2.ScoreRequest(), IA, "no image groups")
    expect_status(stub.Score, score_request(raw(2, 2), weights={"nope": 1.0}), grpc.StatusCode.NOT_FOUND, "nope")
    details = expect_status(
        stub.Score, score_request(raw(32, 32), prompt="no quotes here", weights={"ocr": 1.0}), IA, "groups[0]"
    )
    assert "g0" in details

    good_group = [reward_pb2.ImageGroup(prompt="a", images=[raw(8, 8)])]
    upd = reward_pb2.UpdateDiscriminatorRequest
    expect_status(stub.UpdateDiscriminator, upd(model="dino", generated=good_group), IA, "references")
    expect_status(stub.UpdateDiscriminator, upd(model="dino", references=good_group), IA, "generated")
    expect_status(
        stub.UpdateDiscriminator,
        upd(model="nope", references=good_group, generated=good_group),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    )
    expect_status(
        stub.UpdateDiscriminator,
        upd(model="ocr", references=good_group, generated=good_group),
        grpc.StatusCode.FAILED_PRECONDITION,
        "not trainable",
    )
    expect_status(
        stub.UpdateDiscriminator,
        upd(model="dino", references=good_group, generated=good_group, steps=10**6),
        IA,
        "steps",
    )
    # Over the image-count limit of one request (1024 in the tiny preset).
    many = score_request(*[raw(1, 1)] * 1100, weights={"dino": 1.0})
    expect_status(stub.Score, many, grpc.StatusCode.RESOURCE_EXHAUSTED, "1100")
    # A failed update leaves the version alone; a stream with one bad message names it.
    versions = {m.name: m.version for m in client.list_models()}
    bad_stream = [
        score_request(raw(2, 2), weights={"dino": 1.0}),
        score_request(raw(2, 2, b"x"), weights={"dino": 1.0}),
    ]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ScoreStream(iter(bad_stream), timeout=60))
    assert info.value.code() == IA and "stream message 1" in info.value.details()
    # Still serving, nothing changed.
    assert {m.name: m.version for m in client.list_models()} == versions
    assert len(client.score([Group("a", [np.zeros((8, 8, 3), np.uint8)])])[0].rewards) == 1


def test_malformed_request_bytes_are_invalid_argument(tiny_server, client):
    """Bytes that are no ScoreRequest / UpdateDiscriminatorRequest at all (a client with a broken
    serialiser): INVALID_ARGUMENT naming the message type, and the server keeps serving."""
    IA = grpc.StatusCode.INVALID_ARGUMENT
    truncated = score_request(raw(4, 4)).SerializeToString()[:-5]
    with grpc.insecure_channel(tiny_server.target) as channel:
        for method, message in (("Score", "ScoreRequest"), ("UpdateDiscriminator", "UpdateDiscriminatorRequest")):
            call = channel.unary_unary(f"/{SERVICE}/{method}")  # no serialiser: raw bytes
            expect_status(call, truncated, IA, f"advgrpo.reward.v1.{message}")
            expect_status(call, b"\xff\xff\xff", IA, f"advgrpo.reward.v1.{message}")
        stream = channel.stream_stream(f"/{SERVICE}/ScoreStream")
        good = score_request(raw(2, 2), weights={"dino": 1.0}).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([good, truncated]), timeout=60))
        assert info.value.code() == IA and "stream message 1" in info.value.details(), info.value.details()
    assert len(client.score([Group("a", [np.zeros((8, 8, 3), np.uint8)])])[0].rewards) == 1


def test_message_and_queue_limits_are_resource_exhausted(start_server, tmp_path):
    cfg = tmp_path / "limits.yaml"
    cfg.write_text(
        "models:\n"
        "  noop: {kind: noop, weight: 1.0, batching: {max_batch_size: 4, max_queue_images: 8, max_delay_ms: 1}}\n"
    )
    server = start_server("--config", str(cfg), "--max-message-bytes", "65536", "--no-http")
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 8 << 20)])
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    too_big = score_request(raw(200, 200))  # 120 KB > 64 KiB
    expect_status(stub.Score, too_big, grpc.StatusCode.RESOURCE_EXHAUSTED)
    over_queue = score_request(*[raw(2, 2)] * 9)
    expect_status(stub.Score, over_queue, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue")
    # Many concurrent requests against a queue of 8: every answer is a score or RESOURCE_EXHAUSTED.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stub.Score, score_request(*[raw(2, 2)] * 6), timeout=30) for _ in range(32)]
        codes = []
        for f in futures:
            try:
                assert len(f.result().groups[0].rewards) == 6
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert grpc.StatusCode.OK in codes
    assert len(stub.Score(score_request(raw(2, 2)), timeout=30).groups[0].rewards) == 1
    channel.close()


def test_auth_token_required_except_for_health(start_server, tmp_path):
    cfg = tmp_path / "noop.yaml"
    cfg.write_text("models:\n  noop: {kind: noop, weight: 1.0}\n")
    server = start_server("--config", str(cfg), "--no-http", env={"ADVGRPO_AUTH_TOKEN": "s3cret"})
    with RewardClient(server.target) as anonymous:
        assert anonymous.health() == "SERVING"
        with pytest.raises(grpc.RpcError) as info:
            anonymous.list_models()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(anonymous.score_stream([Group("p", [np.zeros((2, 2, 3), np.uint8)])]))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for mode in (False, "auto"):  # "auto" asks CheckSharedMemory first: refused the same way
        with RewardClient(server.target, token="wrong", shared_memory=mode) as wrong:
            with pytest.raises(grpc.RpcError) as info:
                wrong.score([Group("p", [np.zeros((2, 2, 3), np.uint8)])])
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with RewardClient(server.target, token="s3cret") as ok:
        assert [m.name for m in ok.list_models()] == ["noop"]
        assert ok.score([Group("p", [np.zeros((2, 2, 3), np.uint8)])])[0].rewards == [0.0]


def test_sigterm_drains_not_serving_then_finishes_in_flight_streams(start_server, tmp_path):
    import queue
    import signal
    import time

    cfg = tmp_path / "drain.yaml"
    cfg.write_text("server: {drain_notice_s: 1.5, drain_grace_s: 10}\nmodels:\n  noop: {kind: noop, weight: 1.0}\n")
    server = start_server("--config", str(cfg), "--no-http")
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    responses = stub.ScoreStream(requests(), timeout=60)
    outbox.put(score_request(raw(2, 2)))
    assert len(next(responses).groups) == 1
    check = lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status  # noqa: E731
    assert check() == health_pb2.HealthCheckResponse.SERVING

    server.proc.send_signal(signal.SIGTERM)
    seen, deadline = None, time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = check()
        if seen == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.05)
    assert seen == health_pb2.HealthCheckResponse.NOT_SERVING
    # The stream opened before the signal is still served during the drain.
    time.sleep(1.6)  # past the notice: new RPCs are refused, in-flight ones continue
    outbox.put(score_request(raw(2, 2)))
    assert len(next(responses).groups) == 1
    outbox.put(None)
    assert list(responses) == []
    assert server.proc.wait(30) == 0
    channel.close()


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_serves_on_an_ipv6_host(start_server):
    import urllib.request

    server = start_server("--preset", "noop", "--host", "::1")
    assert server.target.startswith("[::1]:") and server.info["http"].startswith("http://[::1]:")
    with RewardClient(server.target) as client:
        assert client.score([Group("p", [np.zeros((8, 8, 3), np.uint8)])])[0].rewards == [0.0]
    with urllib.request.urlopen(server.info["http"] + "/healthz", timeout=10) as r:
        assert r.status == 200
