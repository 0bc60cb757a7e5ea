"""Image bytes through /dev/shm for clients on the server's host (advgrpo.common.shared_memory)."""

from __future__ import annotations

import errno
import logging
import os
import threading
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest

from advgrpo.client import Group, RewardClient
from advgrpo.common import shared_memory as shm_module
from advgrpo.common.errors import InvalidArgument
from advgrpo.common.process import ServerProcess
from advgrpo.common.shared_memory import SHM_DIR, SharedMemoryArena, SharedMemoryReader, check_readable
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

from .conftest import noise_image, smooth_image

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm (Linux)")


def groups(seed: int, n_groups: int = 3, per_group: int = 4) -> list[Group]:
    rng = np.random.default_rng(seed)
    return [
        Group(f'a sign saying "{i}"', [smooth_image(rng, 48 + 8 * j) for j in range(per_group)], f"g{i}")
        for i in range(n_groups)
    ]


def our_segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"advgrpo-{os.getpid()}-*")}


@pytest.fixture(scope="module")
def clients(tiny_server):
    inline = RewardClient(tiny_server.target, timeout_s=60)
    inline.wait_ready(60)
    shared = RewardClient(tiny_server.target, timeout_s=60, shared_memory=True)
    yield inline, shared
    inline.close()
    shared.close()


def test_scores_through_shared_memory_equal_inline_scores(clients):
    inline, shared = clients
    weights = {"dino": 1.0, "pickscore": 0.5, "ocr": 0.25}
    before = our_segments()  # other tests in this worker process may hold segments of their own
    for seed in range(2):
        want = inline.score(groups(seed), weights)
        got = shared.score(groups(seed), weights)
        assert got == want  # rewards, components and versions, exactly
    assert len(our_segments() - before) == 1  # one segment, reused by every call


def test_update_through_shared_memory(clients):
    inline, shared = clients
    rng = np.random.default_rng(5)
    refs = [Group("r", [smooth_image(rng) for _ in range(4)])]
    gens = [Group("g", [noise_image(rng) for _ in range(4)])]
    before = {m.name: m.version for m in inline.list_models()}["dino"]
    result = shared.update_discriminator("dino", refs, gens, steps=2)
    assert result.version == before + 1 and not result.replayed
    # The server read the same pixels: scoring them inline now gives the reported means.
    ref_scores = inline.score(refs, {"dino": 1.0})[0].rewards
    assert np.mean(ref_scores) == pytest.approx(result.reference_score, abs=1e-5)


def test_concurrent_calls_share_the_client_safely(clients):
    inline, shared = clients
    want = inline.score(groups(9), {"dino": 1.0})
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(shared.score(groups(9), {"dino": 1.0}))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 12
    assert all(r == want for r in results)  # calls that found the segment busy went inline


def test_bad_references_get_clear_statuses(tiny_server):
    IA = grpc.StatusCode.INVALID_ARGUMENT
    segment = shared_memory.SharedMemory(name=f"advgrpo-{os.getpid()}-test", create=True, size=4096)
    try:
        segment.buf[:48] = bytes(range(48))
        channel = grpc.insecure_channel(tiny_server.target)
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        def request(name: str, offset: int = 0, size: int = 48, data: bytes = b""):
            image = reward_pb2.Image(
                encoding=reward_pb2.ENCODING_RAW_RGB8,
                height=4,
                width=4,
                data=data,
                shared_memory=reward_pb2.SharedMemorySlice(name=name, offset=offset, size=size),
            )
            return reward_pb2.ScoreRequest(
                groups=[reward_pb2.ImageGroup(prompt="p", images=[image])], weights={"dino": 1.0}
            )

        def status(req) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as info:
                stub.Score(req, timeout=60)
            return info.value.code(), info.value.details()

        ok = stub.Score(request(segment.name), timeout=60)
        assert len(ok.groups[0].rewards) == 1
        for bad, fragment in (
            (request("../etc/passwd"), "is not a segment name"),
            (request("advgrpo-no-such-segment"), "no shared-memory segment"),
            (request(segment.name, offset=4090), "past the end"),
            (request(segment.name, size=47), "47 bytes"),
            (request(segment.name, data=bytes(48)), "not both"),
        ):
            code, details = status(bad)
            assert code == IA and fragment in details and "groups[0].images[0]" in details, details
        assert len(stub.Score(request(segment.name), timeout=60).groups[0].rewards) == 1  # still serving
        channel.close()
    finally:
        segment.close()
        segment.unlink()


def test_streams_through_shared_memory_equal_inline_streams(tiny_server, clients):
    inline, _ = clients
    weights = {"dino": 1.0, "pickscore": 0.5}
    many = groups(7, n_groups=6, per_group=3)
    want = list(inline.score_stream(iter(many), weights))
    before = our_segments()
    with RewardClient(tiny_server.target, timeout_s=60, shared_memory=True, stream_slots=2) as client:
        for _ in range(2):  # a second stream reuses the first one's segments
            assert list(client.score_stream(iter(many), weights)) == want
            slots = client._stream_slots
            assert 1 <= slots.segments <= 2 and slots._out == 0  # bounded, and all given back
        assert 1 <= len(our_segments() - before) <= 2
    assert our_segments() == before  # close() removes them


@pytest.fixture(scope="module")
def server_without_shm(tmp_path_factory):
    config = tmp_path_factory.mktemp("no-shm") / "server.yaml"
    config.write_text("server:\n  shared_memory: false\n")
    server = ServerProcess(["--preset", "noop", "--config", str(config), "--no-http"])
    yield server
    server.stop()


def test_a_server_with_shared_memory_off_refuses_it(server_without_shm):
    server = server_without_shm
    before = our_segments()  # other tests' clients may hold theirs
    with RewardClient(server.target, timeout_s=60, shared_memory=True) as client:
        client.wait_ready(60)
        with pytest.raises(grpc.RpcError) as info:
            client.score(groups(0, 1, 1))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "server.shared_memory" in info.value.details()
        assert our_segments() == before, "a failed call drops its segment"
        with pytest.raises(grpc.RpcError) as info:
            list(client.score_stream(iter(groups(1, 3, 1))))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert our_segments() == before, "a failed stream drops the segments it had in flight"
        assert client._stream_slots._out == 0


def test_client_removes_its_segment_on_close(tiny_server):
    client = RewardClient(tiny_server.target, timeout_s=60, shared_memory=True)
    before = our_segments()
    client.score(groups(1, 1, 2), {"dino": 1.0})
    assert len(our_segments() - before) == 1
    client.close()
    assert our_segments() == before


def test_reader_reads_a_replaced_segment_and_keeps_nothing_open(tmp_path: Path):
    reader = SharedMemoryReader(root=tmp_path)
    (tmp_path / "advgrpo-a").write_bytes(b"first contents")
    assert reader.read("advgrpo-a", 0, 5, "x") == b"first"
    replacement = tmp_path / "advgrpo-a.new"
    replacement.write_bytes(b"second!")
    replacement.replace(tmp_path / "advgrpo-a")  # a new inode under the same name
    assert reader.read("advgrpo-a", 0, 6, "x") == b"second"
    for name in ("advgrpo-b", "advgrpo-c"):
        (tmp_path / name).write_bytes(name.encode())
        assert reader.read(name, 8, 1, "x") == name[-1].encode()
    held = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    held += Path("/proc/self/maps").read_text().split()
    assert not [p for p in held if p.startswith(str(tmp_path.resolve()))]  # no fd or mapping outlives a read
    (tmp_path / "advgrpo-empty").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="empty"):
        reader.read("advgrpo-empty", 0, 0, "x")


def check(stub, name: str, offset: int, size: int, expected: bytes) -> reward_pb2.CheckSharedMemoryResponse:
    ref = reward_pb2.SharedMemorySlice(name=name, offset=offset, size=size)
    return stub.CheckSharedMemory(reward_pb2.CheckSharedMemoryRequest(slice=ref, expected=expected), timeout=30)


def test_check_shared_memory_rpc(tiny_server, server_without_shm):
    arena = SharedMemoryArena()
    token = os.urandom(16)
    ((name, offset, size),) = arena.place([b"x" * 100, token])[1:]
    try:
        with grpc.insecure_channel(tiny_server.target) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            assert check(stub, name, offset, size, token).readable
            other = check(stub, name, offset, size, os.urandom(16))
            assert not other.readable and "holds other bytes" in other.detail
            missing = check(stub, "advgrpo-nowhere", 0, 16, token)
            assert not missing.readable and "no shared-memory segment 'advgrpo-nowhere'" in missing.detail
            for bad, field in (
                ((name, offset, size, b""), "expected"),
                ((name, offset, size, b"x" * 65), "expected"),
                ((name, offset, 8, token), "slice.size"),
                (("elsewhere", offset, size, token), "slice.shared_memory.name"),
                ((name, 1 << 40, size, token), "past the end"),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    check(stub, *bad)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert field in info.value.details()
        with grpc.insecure_channel(server_without_shm.target) as channel:
            off = check(reward_pb2_grpc.RewardServiceStub(channel), name, offset, size, token)
            assert not off.readable and "server.shared_memory: false" in off.detail
    finally:
        arena.discard()


def test_a_server_in_another_ipc_namespace_cannot_read(tmp_path: Path):
    """Another /dev/shm (another container or host) has no such segment: not readable."""
    arena = SharedMemoryArena()
    token = os.urandom(16)
    ((name, offset, size),) = arena.place([token])
    try:
        ref = reward_pb2.SharedMemorySlice(name=name, offset=offset, size=size)
        assert check_readable(SharedMemoryReader(), ref, token) == (True, "")
        readable, detail = check_readable(SharedMemoryReader(root=tmp_path), ref, token)
        assert not readable and "another IPC namespace" in detail
    finally:
        arena.discard()


def test_reader_names_a_segment_it_may_not_open(tmp_path: Path, monkeypatch):
    (tmp_path / "advgrpo-theirs").write_bytes(b"pixels")

    def denied(path, flags, *args):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shm_module.os, "open", denied)
    with pytest.raises(shm_module.SegmentUnreadable, match="permission denied"):
        SharedMemoryReader(root=tmp_path).read("advgrpo-theirs", 0, 6, "groups[0].images[0]")


def test_auto_uses_shared_memory_where_the_server_reads_it(clients, tiny_server):
    inline, _ = clients
    before = our_segments()
    with RewardClient(tiny_server.target, timeout_s=60, shared_memory="auto") as auto:
        assert auto.uses_shared_memory()
        assert auto.score(groups(7), {"dino": 1.0}) == inline.score(groups(7), {"dino": 1.0})
        assert [s.rewards for s in auto.score_stream(iter(groups(8)), {"dino": 1.0})] == [
            s.rewards for s in inline.score(groups(8), {"dino": 1.0})
        ]
        assert auto._arena.name is not None and len(our_segments() - before) >= 1
    assert our_segments() == before


def test_auto_falls_back_to_the_socket_where_the_server_cannot_read(server_without_shm, caplog):
    before = our_segments()
    with RewardClient(server_without_shm.target, timeout_s=60, shared_memory="auto") as auto:
        auto.wait_ready(60)
        with caplog.at_level(logging.WARNING, logger="advgrpo.client"):
            got = auto.score(groups(0, 2, 2))
            streamed = list(auto.score_stream(iter(groups(0, 2, 2))))
        assert not auto.uses_shared_memory()
        assert [g.rewards for g in got] == [g.rewards for g in streamed] == [[0.0, 0.0], [0.0, 0.0]]
        warnings = [
            r.getMessage() for r in caplog.records if "cannot read this client's shared memory" in r.getMessage()
        ]
        assert len(warnings) == 1 and "server.shared_memory: false" in warnings[0]  # asked once
        assert our_segments() == before  # the probe's segment is gone


def test_a_full_dev_shm_sends_the_bytes_inline(clients, tiny_server, monkeypatch, caplog):
    """fallocate fails with ENOSPC where /dev/shm is full (writing would raise SIGBUS instead)."""
    inline, _ = clients
    weights = {"dino": 1.0}
    want = inline.score(groups(3), weights)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = our_segments()
    with RewardClient(tiny_server.target, timeout_s=60, shared_memory=True, stream_slots=2) as client:
        monkeypatch.setattr(shm_module.os, "posix_fallocate", full)
        with caplog.at_level(logging.WARNING, logger="advgrpo.client"):
            assert client.score(groups(3), weights) == want
            assert [s.rewards for s in client.score_stream(iter(groups(3)), weights)] == [g.rewards for g in want]
        assert any("go through the socket" in r.getMessage() for r in caplog.records)
        assert our_segments() == before  # nothing half-made is left behind
        assert client._stream_slots._out == 0
        monkeypatch.undo()
        assert client.score(groups(3), weights) == want  # room again: back through shared memory
        assert len(our_segments() - before) == 1
