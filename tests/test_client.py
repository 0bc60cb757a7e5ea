"""Client behaviour that needs no running model: retries on UNAVAILABLE, encoding, chunking plans."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from advgrpo.client import Group, RetryPolicy, RewardClient
from advgrpo.common.images import decode_image, encode_image, to_uint8_hwc

from .conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_client_retries_unavailable_until_the_server_is_up(tmp_path):
    """No attempt count: the time budget (30 s by default) outlasts a server that starts late,
    where the old policy gave up after 6 attempts. The server process starts 3 s late."""
    port = free_port()
    cfg = tmp_path / "noop.yaml"
    cfg.write_text("models:\n  noop: {kind: noop, weight: 1.0, params: {value: 0.25}}\n")
    client = RewardClient(f"127.0.0.1:{port}", retry=RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5))
    procs: list[subprocess.Popen] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "advgrpo.reward_server", "--config", str(cfg), "--port", str(port), "--no-http"],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    timer = threading.Timer(3.0, start)
    timer.start()
    try:
        t0 = time.monotonic()
        result = client.score([Group("p", [np.zeros((4, 4, 3), np.uint8)])])  # sent before the server listens
        assert result[0].rewards == [0.25]
        assert time.monotonic() - t0 > 3.0  # it really had to wait for the server
    finally:
        timer.join()
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        client.close()


def test_client_gives_up_after_max_attempts():
    client = RewardClient(
        f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    )
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        client.list_models()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < 5  # the attempt count, not the 30 s time budget, ended it
    client.close()


class RefusingService:
    """A RewardService whose unary calls all fail with ``code`` (and ``trailer``). It records each
    attempt it receives: the method, and A6's ``grpc-previous-rpc-attempts`` header (0 on a first
    attempt), which gRPC adds where the client's gRPC retried the call itself."""

    def __init__(self, code: grpc.StatusCode, trailer: tuple = ()):
        self.code, self.trailer = code, trailer
        self.attempts: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def handler(self, method: str):
        def refuse(request: bytes, context) -> bytes:
            previous = int(dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts", 0))
            with self.lock:
                self.attempts.append((method, previous))
            context.set_trailing_metadata(self.trailer)
            context.abort(self.code, f"{method} refused by the test")

        return grpc.unary_unary_rpc_method_handler(refuse)

    def of(self, method: str) -> list[int]:
        with self.lock:
            return [previous for m, previous in self.attempts if m == method]


@pytest.fixture
def refusing_server(in_process_server):
    """Factory: refusing_server(service) -> target; the servers stop after the test."""
    from advgrpo.client.client import SERVICE

    def start(service: RefusingService) -> str:
        methods = ("Score", "UpdateDiscriminator", "ListModels", "CheckSharedMemory")
        handlers = {m: service.handler(m) for m in methods}
        return in_process_server(
            lambda server: server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        )

    return start


def test_client_gives_up_once_the_retry_time_budget_is_spent(refusing_server):
    """Counted by a server that refuses every call with UNAVAILABLE: gRPC retries each call itself
    (a service-config retryPolicy, up to 5 attempts), and the client calls again once those are
    spent, until its time budget ends."""
    service = RefusingService(grpc.StatusCode.UNAVAILABLE)
    client = RewardClient(
        refusing_server(service), retry=RetryPolicy(max_elapsed_s=1.0, initial_backoff_s=0.05, max_backoff_s=0.2)
    )
    calls = []
    inner = client._stub.ListModels
    client._stub.ListModels = lambda *a, **kw: calls.append(1) or inner(*a, **kw)
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.list_models()
        took = time.monotonic() - t0
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        attempts = service.of("ListModels")
        assert 1.0 <= took < 2.5 and len(attempts) > 6  # more attempts than the old fixed 6
        assert max(attempts) == 4  # gRPC's own retries: the first call made all 5 of its attempts
        assert len(calls) > 1 and len(attempts) > len(calls)  # then the client called again
    finally:
        client.close()


def test_a_deadline_shorter_than_grpcs_backoffs_still_retries_for_the_whole_budget():
    """gRPC's own attempts share a call's deadline: with backoffs longer than the deadline, a down
    server must still be retried for max_elapsed_s and end in UNAVAILABLE, not in an early
    DEADLINE_EXCEEDED (which is never retried)."""
    for timeout_s in (0.5, 1.5):
        client = RewardClient(
            f"127.0.0.1:{free_port()}",
            timeout_s=timeout_s,
            retry=RetryPolicy(initial_backoff_s=1.0, max_backoff_s=5.0, max_elapsed_s=4.0),
        )
        t0 = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as info:
                client.list_models()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (timeout_s, info.value.code())
            assert time.monotonic() - t0 >= 3.0, timeout_s  # the budget, not one deadline
        finally:
            client.close()


def test_client_retries_a_closed_port_past_grpcs_own_attempts():
    client = RewardClient(
        f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_elapsed_s=1.0, initial_backoff_s=0.05, max_backoff_s=0.2)
    )
    calls = []
    inner = client._stub.ListModels
    client._stub.ListModels = lambda *a, **kw: calls.append(1) or inner(*a, **kw)
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.list_models()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(calls) > 1  # gRPC's attempts of the first call were spent well within the budget
    finally:
        client.close()


def test_a_policy_with_max_attempts_makes_exactly_that_many(refusing_server):
    """gRPC does not tell the caller how many attempts a call made, so a policy that counts them
    has the client make each one itself (no gRPC retries: every attempt is a first one)."""
    service = RefusingService(grpc.StatusCode.UNAVAILABLE)
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    with RewardClient(refusing_server(service), retry=retry) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.list_models()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert service.of("ListModels") == [0, 0, 0]


COUNTED = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)  # the client's attempts only
TIMED = RetryPolicy(max_elapsed_s=0.3, initial_backoff_s=0.01, max_backoff_s=0.02)  # gRPC's own retries first


@pytest.mark.parametrize("retry", [COUNTED, TIMED], ids=["max_attempts", "max_elapsed_s"])
@pytest.mark.parametrize(
    "code, pushback, retried",
    [
        ("RESOURCE_EXHAUSTED", None, False),  # a size limit: neither gRPC nor the client retries it
        ("RESOURCE_EXHAUSTED", "-1", False),  # our server's size limits say so (A6: do not retry)
        ("RESOURCE_EXHAUSTED", "0", True),  # transient: the client retries it, gRPC does not
        ("RESOURCE_EXHAUSTED", "10", True),
        ("UNAVAILABLE", "-1", False),  # A6: a negative or unparseable pushback, whatever the status
        ("UNAVAILABLE", "soon", False),
        ("INVALID_ARGUMENT", None, False),
    ],
)
def test_which_refusals_are_sent_again(refusing_server, retry, code, pushback, retried):
    trailer = (("grpc-retry-pushback-ms", pushback),) if pushback is not None else ()
    service = RefusingService(grpc.StatusCode[code], trailer)
    with RewardClient(refusing_server(service), retry=retry) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.score([Group("p", [np.zeros((4, 4, 3), np.uint8)])])
    assert info.value.code() == grpc.StatusCode[code]
    attempts = service.of("Score")
    assert set(attempts) == {0}  # each one the client's own: gRPC retried none of them
    if not retried:
        assert len(attempts) == 1  # sent exactly once
    elif retry is COUNTED:
        assert len(attempts) == 4
    else:
        assert len(attempts) > 1


def test_grpc_retries_requests_bigger_than_its_default_retry_buffer(refusing_server):
    """gRPC sends but never retries a request over grpc.per_rpc_retry_buffer_size (256 KiB by
    default); the client raises it to its message limit, so a 1.2 MB Score is retried too."""
    service = RefusingService(grpc.StatusCode.UNAVAILABLE)
    retry = RetryPolicy(max_elapsed_s=0.2, initial_backoff_s=0.01, max_backoff_s=0.02)
    with RewardClient(refusing_server(service), retry=retry, parallel_calls=1) as client:
        with pytest.raises(grpc.RpcError):
            client.score([Group("p", [np.zeros((400, 1000, 3), np.uint8)])])
    assert max(service.of("Score")) == 4


def test_update_retries_resend_the_same_idempotency_key(refusing_server):
    from advgrpo.reward.v1 import reward_pb2

    keys = []

    class Recording(RefusingService):
        def handler(self, method):
            inner = super().handler(method).unary_unary

            def record(request, context):
                if method == "UpdateDiscriminator":
                    keys.append(reward_pb2.UpdateDiscriminatorRequest.FromString(request).update_id)
                return inner(request, context)

            return grpc.unary_unary_rpc_method_handler(record)

    service = Recording(grpc.StatusCode.UNAVAILABLE)
    image = np.zeros((4, 4, 3), np.uint8)
    with RewardClient(refusing_server(service), retry=RetryPolicy(max_elapsed_s=0.3, max_backoff_s=0.05)) as client:
        with pytest.raises(grpc.RpcError):
            client.update_discriminator("dino", [Group("r", [image])], [Group("g", [image])])
    assert len(keys) > 1 and len(set(keys)) == 1 and keys[0]


def test_retry_policy_needs_a_limit():
    assert RetryPolicy().max_elapsed_s == 30.0 and RetryPolicy().max_attempts is None
    with pytest.raises(ValueError, match="max_attempts or max_elapsed_s"):
        RetryPolicy(max_attempts=None, max_elapsed_s=None)


def test_encode_accepts_pil_arrays_and_tensors_and_round_trips():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    chw_float = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    for source in (img, Image.fromarray(img), chw_float, chw_float.permute(1, 2, 0).numpy()):
        assert np.array_equal(to_uint8_hwc(source), img)
    for enc in ("raw", "png"):
        msg = encode_image(img, enc)
        assert np.array_equal(decode_image(msg, "x"), img)
    jpeg = decode_image(encode_image(img, "jpeg"), "x")
    assert jpeg.shape == img.shape
    gray = to_uint8_hwc(np.zeros((3, 4), np.uint8))
    assert gray.shape == (3, 4, 3)
    with pytest.raises(ValueError, match="encoding"):
        encode_image(img, "webp")


def test_requests_fill_image_by_image_under_budget_and_in_order():
    from advgrpo.reward.v1 import reward_pb2

    client = RewardClient("127.0.0.1:1")
    groups = [
        client._encode_group(Group(f"p{g}", [np.full((10, 10, 3), 10 * g + i, np.uint8) for i in range(n)], f"g{g}"), g)
        for g, n in enumerate([7, 0, 3, 1])  # 300 B per raw image; group 1 is empty
    ]
    requests = list(client._requests(groups, {"m": 1.0}, 1000))
    assert len(requests) > 1
    seen: list[tuple[int, int]] = []
    for batch, parts in requests:
        msg = reward_pb2.ScoreRequest.FromString(batch.serialize())
        assert msg.ByteSize() <= 1000 and dict(msg.weights) == {"m": 1.0}
        assert [(g.group_id, g.prompt) for g in msg.groups] == [(f"g{i}", f"p{i}") for i, _ in parts]
        seen += parts
    # Each group's pieces in order, every image exactly once, the empty group sent too.
    assert seen == sorted(seen) and {i for i, _ in seen} == {0, 1, 2, 3}
    pixels = [data[0] for batch, _ in requests for g in batch.groups for *_, data in g.images]
    assert pixels == [*range(7), 20, 21, 22, 30]
    # All but the last request are full up to one image and a group header.
    sizes = [sum(g.nbytes() for g in batch.groups) for batch, _ in requests]
    assert all(s > 1000 - 300 - 100 for s in sizes[:-1])
    # An image bigger than the budget travels alone rather than being refused here.
    big = client._encode_group(Group("p", [np.zeros((20, 20, 3), np.uint8)]), 0)
    assert [len(b.groups[0].images) for b, _ in client._requests([big, groups[3]], {}, 1000)] == [1, 1]
    client.close()


def test_requests_carry_at_most_max_images_per_call():
    client = RewardClient("127.0.0.1:1", max_images_per_call=4)
    tiny = np.zeros((4, 4, 3), np.uint8)
    groups = [client._encode_group(Group(f"p{g}", [tiny] * n), g) for g, n in enumerate([3, 0, 6, 1, 4])]
    requests = list(client._requests(groups, {}, 1 << 20))  # bytes never bind here
    counts = [sum(len(g.images) for g in batch.groups) for batch, _ in requests]
    assert counts == [4, 4, 4, 2]  # all but the last request full
    seen = [p for _, parts in requests for p in parts]
    assert seen == sorted(seen) and {i for i, _ in seen} == {0, 1, 2, 3, 4}
    # The default follows the server's server.max_images_per_request (1024).
    default = RewardClient("127.0.0.1:1")
    (big,) = [default._encode_group(Group("p", [tiny] * 1100), 0)]
    assert [sum(len(g.images) for g in b.groups) for b, _ in default._requests([big], {}, 1 << 30)] == [1024, 76]
    client.close()
    default.close()


def test_a_group_with_references_is_never_split_and_its_references_count():
    client = RewardClient("127.0.0.1:1", max_images_per_call=6)
    tiny, ref = np.zeros((10, 10, 3), np.uint8), np.ones((10, 10, 3), np.uint8)  # 300 B each, raw
    groups = [
        client._encode_group(Group("a", [tiny] * 2), 0),
        client._encode_group(Group("b", [tiny] * 3, references=[ref] * 2), 1),  # 5 images, 1500 B
        client._encode_group(Group("c", [tiny] * 2), 2),
    ]
    assert groups[1].image_count() == 5 and groups[1].nbytes() > 5 * 300
    for budget, max_images in ((1200, 6), (1 << 20, 6), (1 << 20, 4)):  # a limit the group alone exceeds too
        client.max_images_per_call = max_images
        requests = list(client._requests(groups, {}, budget))
        sent = [(i, part) for _, parts in requests for i, part in parts]
        assert (1, 0) in sent and (1, 1) not in sent, (budget, max_images)  # one part: the whole group
        (carrier,) = [b for b, parts in requests if any(i == 1 for i, _ in parts)]
        (b,) = [g for g in carrier.groups if g.index == 1]
        assert len(b.images) == 3 and len(b.references) == 2
        for batch, parts in requests:
            if len(parts) > 1:  # requests with company stay within both limits, references included
                assert sum(g.nbytes() for g in batch.groups) <= budget
                assert sum(g.image_count() for g in batch.groups) <= max_images
    # Divided into parallel calls, such groups still go whole, in at most parallel_calls calls.
    parallel = RewardClient("127.0.0.1:1", parallel_calls=3, min_call_bytes=10_000)
    rng = np.random.default_rng(0)
    for sizes in ([4, 4, 4, 4], [1, 9, 2], [2] * 7):
        big = [
            parallel._encode_group(
                Group("p", [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)] * n, references=[ref]), i
            )
            for i, n in enumerate(sizes)
        ]  # 4800 B per image
        requests = list(parallel._requests(big, {}, parallel._call_budget(big)))
        assert len(requests) <= 3, sizes
        assert all(part == 0 for _, parts in requests for _, part in parts)
    parallel.close()
    with pytest.raises(ValueError, match=r"generated\[0\] has Group.references"):
        client.update_discriminator("dino", [Group("a", [tiny])], [Group("a", [tiny], references=[ref])])
    client.close()


def test_call_budget_divides_big_payloads_into_at_most_parallel_calls():
    client = RewardClient("127.0.0.1:1", parallel_calls=3, min_call_bytes=10_000)
    rng = np.random.default_rng(0)
    for sizes in ([16], [5, 11], [1] * 9, [3, 3, 3, 3, 4]):
        groups = [
            client._encode_group(Group("p", [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)] * n), i)
            for i, n in enumerate(sizes)
        ]  # 4800 B per image
        budget = client._call_budget(groups)
        assert budget < client.chunk_bytes
        assert len(list(client._requests(groups, {}, budget))) == 3, sizes
    small = [client._encode_group(Group("p", [np.zeros((40, 40, 3), np.uint8)] * 3), 0)]  # < 2 x 10 kB
    assert client._call_budget(small) == client.chunk_bytes
    client.close()


def test_hand_written_wire_format_parses_as_the_same_score_request():
    from advgrpo.client.encoding import ScoreBatch, UpdateBatch
    from advgrpo.reward.v1 import reward_pb2

    client = RewardClient("127.0.0.1:1")
    rng = np.random.default_rng(1)
    groups = [
        client._encode_group(
            Group("a “quoted” prompt", [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)] * 2, "g0"), 0
        ),
        client._encode_group(Group("", [np.zeros((300, 1, 3), np.uint8)]), 1),  # empty prompt, long varints
    ]
    refs = [np.full((2, 3, 3), 7, np.uint8), np.zeros((300, 1, 3), np.uint8)]
    png = RewardClient("127.0.0.1:1", encoding="png")._encode_group(
        Group("p", [np.ones((3, 3, 3), np.uint8)], references=refs), 2
    )
    assert len(png.references) == 2  # ImageGroup.references, PNG like the images
    batch = ScoreBatch(groups + [png], {"dino": 0.5, "ocr": 0.0, "pickscore": -2.25})
    expected = reward_pb2.ScoreRequest(weights=batch.weights)
    for g in batch.groups:
        g.add_to(expected.groups)
    parsed = reward_pb2.ScoreRequest.FromString(batch.serialize())
    assert parsed == expected
    assert ScoreBatch([], {}).serialize() == b""

    update = UpdateBatch("dino", groups[:1], groups[1:] + [png], 3, "id-1")
    expected = reward_pb2.UpdateDiscriminatorRequest(model="dino", steps=3, update_id="id-1")
    for g in update.references:
        g.add_to(expected.references)
    for g in update.generated:
        g.add_to(expected.generated)
    assert reward_pb2.UpdateDiscriminatorRequest.FromString(update.serialize()) == expected
    assert UpdateBatch("", [], [], 0, "").serialize() == b""
    client.close()


def test_min_versions_are_written_as_the_map_protobuf_parses_and_go_with_every_request():
    from advgrpo.client.encoding import ScoreBatch, check_min_versions
    from advgrpo.client.shared_memory import place_request
    from advgrpo.common.shared_memory import SharedMemoryArena
    from advgrpo.reward.v1 import reward_pb2

    client = RewardClient("127.0.0.1:1")
    groups = [
        client._encode_group(Group(f"p{g}", [np.full((10, 10, 3), g, np.uint8)] * 3, f"g{g}"), g) for g in range(3)
    ]
    # Zero, one-byte and multi-byte varints, the largest uint64, a non-ASCII name.
    min_versions = {"dino": 7, "pickscore": 0, "ocr": 300, "ü": 2**64 - 1}
    batch = ScoreBatch(groups, {"dino": 1.0}, min_versions)
    expected = reward_pb2.ScoreRequest(weights={"dino": 1.0}, min_versions=min_versions)
    for g in groups:
        g.add_to(expected.groups)
    assert reward_pb2.ScoreRequest.FromString(batch.serialize()) == expected
    alone = ScoreBatch([], {}, {"dino": 1})
    assert reward_pb2.ScoreRequest.FromString(alone.serialize()) == reward_pb2.ScoreRequest(min_versions={"dino": 1})
    assert ScoreBatch([], {}).serialize() == b""  # no map, no bytes
    # Every request a payload is packed into carries them (and the weights), as do replays and
    # requests whose images go through shared memory.
    requests = list(client._requests(groups, {"dino": 1.0}, 700, min_versions))
    assert len(requests) > 1
    for request, _ in requests:
        parsed = reward_pb2.ScoreRequest.FromString(request.serialize())
        assert dict(parsed.min_versions) == min_versions and dict(parsed.weights) == {"dino": 1.0}
    assert batch.with_groups(groups[:1]).min_versions == min_versions
    arena = SharedMemoryArena()
    try:
        placed = place_request(batch, arena)
        assert dict(reward_pb2.ScoreRequest.FromString(placed.serialize()).min_versions) == min_versions
    finally:
        arena.close()
    # What the client refuses before sending, naming the argument.
    assert check_min_versions(None) == {} and check_min_versions({"d": np.uint8(3)}) == {"d": 3}
    for bad, message in (
        ({"": 1}, r"min_versions: model names must be non-empty strings, got ''"),
        ({1: 1}, r"min_versions: model names must be non-empty strings, got 1"),
        ({"dino": -1}, r"min_versions\['dino'\]: a version is an integer >= 0, got -1"),
        ({"dino": 1.5}, r"min_versions\['dino'\]: a version is an integer >= 0"),
        ({"dino": True}, r"min_versions\['dino'\]: a version is an integer >= 0"),
        ({"dino": 2**64}, r"min_versions\['dino'\]: a version is an integer >= 0"),
        (["dino"], r"min_versions: expected a mapping"),
    ):
        with pytest.raises(ValueError, match=message):
            client.score([Group("p", [np.zeros((4, 4, 3), np.uint8)])], None, bad)
        with pytest.raises(ValueError, match=message):
            client.score_stream([], None, bad)  # at the call, before the stream starts
    client.close()


def test_raw_images_are_not_copied_before_serialisation():
    """The client keeps views of the caller's uint8 arrays until it writes the request (one copy)."""
    client = RewardClient("127.0.0.1:1")
    image = np.zeros((4, 6, 3), np.uint8)
    encoded = client._encode_group(Group("p", [image]), 0)
    data = encoded.images[0][3]
    assert isinstance(data, memoryview) and np.shares_memory(np.asarray(data), image)
    client.close()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_keep_freed_memory_is_accepted_by_glibc():
    """Every mallopt setting (mmap threshold, trim threshold, top pad, arena cap) is taken: in a
    child, so this test process keeps its own allocator settings."""
    code = "from advgrpo.common.allocator import keep_freed_memory as k; print(k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"
