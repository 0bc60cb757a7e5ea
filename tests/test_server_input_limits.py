"""What a request may make the server do: read only regular shared-memory segments, survive one
shrinking under it, decode at most ``server.max_request_decoded_bytes`` per request (checked before
anything is decoded or copied), and refuse images past ``server.max_aspect_ratio``."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image as PILImage

from advgrpo.client import Group, RewardClient
from advgrpo.common import shared_memory as shm_module
from advgrpo.common.errors import ConfigError, InvalidArgument
from advgrpo.common.shared_memory import SHM_DIR, SharedMemoryReader
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc
from advgrpo.reward_server import convert
from advgrpo.reward_server.config import ServerSettings, load_config
from advgrpo.reward_server.host import ModelHost

from .conftest import noise_image, smooth_image

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm (Linux)")

IA = grpc.StatusCode.INVALID_ARGUMENT
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
SIDE = 4096
BIG = SIDE * SIDE * 3  # one 4096x4096 image decoded: 48 MiB


@pytest.fixture(scope="module")
def stub(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)


@pytest.fixture
def segment_path():
    """A /dev/shm path named like a segment, removed (whatever it became) after the test."""
    path = SHM_DIR / f"advgrpo-{os.getpid()}-limits-{uuid.uuid4().hex[:8]}"
    yield path
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()


def shm_image(name: str, h: int, w: int, offset: int = 0, size: int | None = None, encoding=None):
    return reward_pb2.Image(
        encoding=encoding or reward_pb2.ENCODING_RAW_RGB8,
        height=h,
        width=w,
        shared_memory=reward_pb2.SharedMemorySlice(name=name, offset=offset, size=h * w * 3 if size is None else size),
    )


def raw(h: int, w: int) -> reward_pb2.Image:
    return reward_pb2.Image(encoding=reward_pb2.ENCODING_RAW_RGB8, height=h, width=w, data=bytes(h * w * 3))


def score_request(*images, weights=None, prompt='a sign that says "hi"') -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        groups=[reward_pb2.ImageGroup(prompt=prompt, images=list(images))], weights=weights or {"dino": 1.0}
    )


def refused(call, request, code, *fragments, timeout=30) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout)
    details = info.value.details()
    assert info.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return details


def still_serving(stub, server) -> None:
    assert server.proc.poll() is None, server.log
    assert len(stub.Score(score_request(raw(8, 8)), timeout=30).groups[0].rewards) == 1


# ---------------------------------------------------------------- shared-memory segments


def test_a_segment_shrunk_after_a_read_is_invalid_argument_not_sigbus(tiny_server, stub, segment_path):
    name = segment_path.name
    with open(segment_path, "wb") as f:
        f.truncate(1 << 20)
    request = score_request(raw(8, 8), shm_image(name, 16, 16, offset=512 << 10))
    assert len(stub.Score(request, timeout=30).groups[0].rewards) == 2  # the server has read the segment
    os.truncate(segment_path, 4096)  # same inode, smaller: a mapping would now SIGBUS past 4096
    refused(stub.Score, request, IA, "groups[0].images[1]", name, "past the end", "4096 bytes")
    still_serving(stub, tiny_server)


def test_a_segment_shrinking_during_the_read_is_invalid_argument(tmp_path: Path, monkeypatch):
    path = tmp_path / "advgrpo-shrinks"
    path.write_bytes(bytes(4096))
    real_pread = os.pread

    def shrink_first(fd, n, offset):
        os.truncate(path, 100)  # after the size check, before the copy
        return real_pread(fd, n, offset)

    monkeypatch.setattr(shm_module.os, "pread", shrink_first)
    with pytest.raises(InvalidArgument, match=r"groups\[0\].images\[0\].*'advgrpo-shrinks' shrank"):
        SharedMemoryReader(root=tmp_path).read("advgrpo-shrinks", 0, 4096, "groups[0].images[0]")


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_only_regular_files_are_read_as_segments(tiny_server, stub, segment_path, tmp_path, kind):
    """A FIFO named like a segment used to block the event loop in open(); a symlink let a client
    read any file the server could; a directory was INTERNAL."""
    name = segment_path.name
    if kind == "fifo":
        os.mkfifo(segment_path)
    elif kind == "directory":
        segment_path.mkdir()
    else:
        target = tmp_path / "server-secret"
        target.write_bytes(bytes(48))
        segment_path.symlink_to(target)
    try:
        refused(stub.Score, score_request(shm_image(name, 4, 4)), IA, "groups[0].images[0]", name, timeout=10)
    finally:
        if kind == "fifo":  # the old server sat in open() waiting for a writer: let it go
            try:
                os.close(os.open(segment_path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    still_serving(stub, tiny_server)


def test_check_shared_memory_does_not_follow_symlinks(stub, segment_path, tmp_path):
    """CheckSharedMemory answered whether given bytes were there: an oracle for any file the server
    could read, one byte at a time."""
    secret = tmp_path / "server-secret"
    secret.write_bytes(b"hunter2 is the password")
    segment_path.symlink_to(secret)
    slice_ = reward_pb2.SharedMemorySlice(name=segment_path.name, offset=0, size=7)
    answer = stub.CheckSharedMemory(reward_pb2.CheckSharedMemoryRequest(slice=slice_, expected=b"hunter2"), timeout=10)
    assert not answer.readable and "symbolic link" in answer.detail, answer


def test_shared_memory_is_read_off_the_event_loop(segment_path, monkeypatch):
    """A request of RAW images only was decoded on the event loop, shared-memory reads included."""
    host = ModelHost.from_config(load_config("noop"), warmup=False)
    with open(segment_path, "wb") as f:
        f.write(bytes(range(48)))
    threads = []
    real_read = SharedMemoryReader.read

    def read(self, *args):
        threads.append(threading.current_thread())
        return real_read(self, *args)

    monkeypatch.setattr(SharedMemoryReader, "read", read)
    groups = [reward_pb2.ImageGroup(prompt="p", images=[shm_image(segment_path.name, 4, 4)])]

    async def decode():
        with host.decoded_bytes_held() as ticket:
            (decoded,) = await convert.decode_request(host, [("groups", groups)], ticket)
            assert host.decoded_bytes.held == 48  # held until the request is done with its images
        return threading.current_thread(), decoded

    try:
        loop_thread, decoded = asyncio.run(decode())
    finally:
        asyncio.run(host.close())
    assert host.decoded_bytes.held == 0
    assert decoded[0].images[0].tobytes() == bytes(range(48))
    assert threads and loop_thread not in threads


# ---------------------------------------------------------------- decoded bytes per request


def test_the_default_budget_fits_a_training_update_but_not_a_png_bomb():
    budget = ServerSettings().max_request_decoded_bytes
    assert 96 * 512 * 512 * 3 < budget < 40 * BIG  # the trainer's discriminator update; 40 PNGs of 4096²
    for key, value in (("max_request_decoded_bytes", 0), ("max_aspect_ratio", 0.5), ("max_aspect_ratio", float("nan"))):
        with pytest.raises(ConfigError, match=f"server.{key}: must be >= 1"):
            load_config("noop", overrides={"server": {key: value}})


def test_a_png_bomb_is_refused_before_it_is_decoded(tiny_server, stub):
    """40 blank 4096² PNGs are a 2 MB message and 2 GiB of pixels."""
    buf = io.BytesIO()
    PILImage.new("RGB", (SIDE, SIDE)).save(buf, format="PNG", compress_level=9)
    png = reward_pb2.Image(encoding=reward_pb2.ENCODING_PNG, data=buf.getvalue())
    request = score_request(*[png] * 40)
    assert request.ByteSize() < 4 << 20
    refused(stub.Score, request, RE, "server.max_request_decoded_bytes", str(40 * BIG), str(1 << 30))
    still_serving(stub, tiny_server)


def test_shared_memory_images_count_toward_the_budget(tiny_server, stub, segment_path):
    """A 2 KB request naming 1 GiB of pixels in shared memory was read in full, on the event loop."""
    with open(segment_path, "wb") as f:
        f.truncate(BIG)  # sparse: the test costs no memory
    images = [shm_image(segment_path.name, SIDE, SIDE) for _ in range(22)]  # 1056 MiB
    refused(stub.Score, score_request(*images), RE, "server.max_request_decoded_bytes", str(22 * BIG))
    # One budget for an update's references and generations together (528 MiB each).
    update = reward_pb2.UpdateDiscriminatorRequest(
        model="dino",
        references=[reward_pb2.ImageGroup(prompt="r", images=images[:11])],
        generated=[reward_pb2.ImageGroup(prompt="g", images=images[11:])],
    )
    refused(stub.UpdateDiscriminator, update, RE, "server.max_request_decoded_bytes", str(22 * BIG))
    still_serving(stub, tiny_server)


def test_a_training_sized_update_passes(tiny_server):
    """The trainer's default discriminator update: 96 images of 512² (75 MB decoded)."""
    rng = np.random.default_rng(0)
    refs = [Group("r", [smooth_image(rng, 512) for _ in range(48)])]
    gens = [Group("g", [noise_image(rng, 512) for _ in range(48)])]
    with RewardClient(tiny_server.target, timeout_s=120, shared_memory=True) as client:
        result = client.update_discriminator("dino", refs, gens, steps=1)
    assert not result.replayed and np.isfinite(result.loss)


# ---------------------------------------------------------------- aspect ratio


def test_extreme_aspect_ratios_are_invalid_argument(tiny_server, stub):
    """1x4096 made CLIP's processor resize to 224x917504 (12 s, 2.4 GB) and OCR fail (INTERNAL)."""
    weights = {"ocr": 1.0}
    refused(
        stub.Score,
        score_request(raw(8, 8), raw(1, SIDE), weights=weights),
        IA,
        "groups[0].images[1]",
        f"1x{SIDE}",
        "server.max_aspect_ratio",
    )
    buf = io.BytesIO()
    PILImage.new("RGB", (2, 1000)).save(buf, format="PNG")  # 1000 tall, 2 wide
    tall = reward_pb2.Image(encoding=reward_pb2.ENCODING_PNG, data=buf.getvalue())
    refused(stub.Score, score_request(tall, weights=weights), IA, "groups[0].images[0]", "1000x2", "500")
    # 16:1 is allowed (the default max_aspect_ratio).
    ok = stub.Score(score_request(raw(8, 128), raw(128, 8), weights={"dino": 1.0, "pickscore": 1.0}), timeout=60)
    assert len(ok.groups[0].rewards) == 2
    still_serving(stub, tiny_server)
