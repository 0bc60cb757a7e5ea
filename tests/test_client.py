"""Client behaviour that needs no running model: retries on UNAVAILABLE, encoding, chunking plans."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from reward_server.client import Group, RetryPolicy, RewardClient
from reward_server.images import decode_image, encode_image, to_uint8_hwc

from .conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_client_retries_unavailable_until_the_server_is_up(tmp_path):
    port = free_port()
    cfg = tmp_path / "noop.yaml"
    cfg.write_text("models:\n  noop: {kind: noop, weight: 1.0, params: {value: 0.25}}\n")
    client = RewardClient(
        f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=200, initial_backoff_s=0.05, max_backoff_s=0.2)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "reward_server", "--config", str(cfg), "--port", str(port), "--no-http"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.monotonic()
        result = client.score([Group("p", [np.zeros((4, 4, 3), np.uint8)])])  # sent before the server listens
        assert result[0].rewards == [0.25]
        assert time.monotonic() - t0 > 0.2  # it really had to wait for the server
    finally:
        proc.terminate()
        proc.wait(30)
        client.close()


def test_client_gives_up_after_max_attempts():
    client = RewardClient(
        f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    )
    with pytest.raises(grpc.RpcError) as info:
        client.list_models()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    client.close()


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


def test_split_keeps_every_piece_under_budget_and_in_order():
    from advgrpo.reward.v1 import reward_pb2

    client = RewardClient("127.0.0.1:1")
    images = [np.full((10, 10, 3), i, np.uint8) for i in range(7)]  # 300 B each raw
    encoded = client._encode_group(Group("p", images, "g"), 0)
    pieces = encoded.split(1000)
    assert len(pieces) > 1
    for piece in pieces:
        msg = reward_pb2.ScoreRequest()
        piece.add_to(msg.groups)
        assert msg.groups[0].ByteSize() <= piece.nbytes() <= 1000  # the estimate is an upper bound
        assert msg.groups[0].group_id == "g" and msg.groups[0].prompt == "p"
    assert [data[0] for p in pieces for *_, data in p.images] == list(range(7))
    client.close()


def test_hand_written_wire_format_parses_as_the_same_score_request():
    from advgrpo.reward.v1 import reward_pb2
    from reward_server.client import _ScoreBatch, _UpdateBatch

    client = RewardClient("127.0.0.1:1")
    rng = np.random.default_rng(1)
    groups = [
        client._encode_group(Group("a “quoted” prompt", [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)] * 2, "g0"), 0),
        client._encode_group(Group("", [np.zeros((300, 1, 3), np.uint8)]), 1),  # empty prompt, long varints
    ]
    png = RewardClient("127.0.0.1:1", encoding="png")._encode_group(Group("p", [np.ones((3, 3, 3), np.uint8)]), 2)
    batch = _ScoreBatch(groups + [png], {"dino": 0.5, "ocr": 0.0, "pickscore": -2.25})
    expected = reward_pb2.ScoreRequest(weights=batch.weights)
    for g in batch.groups:
        g.add_to(expected.groups)
    parsed = reward_pb2.ScoreRequest.FromString(batch.serialize())
    assert parsed == expected
    assert _ScoreBatch([], {}).serialize() == b""

    update = _UpdateBatch("dino", groups[:1], groups[1:] + [png], 3, "id-1")
    expected = reward_pb2.UpdateDiscriminatorRequest(model="dino", steps=3, update_id="id-1")
    for g in update.references:
        g.add_to(expected.references)
    for g in update.generated:
        g.add_to(expected.generated)
    assert reward_pb2.UpdateDiscriminatorRequest.FromString(update.serialize()) == expected
    assert _UpdateBatch("", [], [], 0, "").serialize() == b""
    client.close()


def test_raw_images_are_not_copied_before_serialisation():
    """The client keeps views of the caller's uint8 arrays until it writes the request (one copy)."""
    client = RewardClient("127.0.0.1:1")
    image = np.zeros((4, 6, 3), np.uint8)
    encoded = client._encode_group(Group("p", [image]), 0)
    data = encoded.images[0][3]
    assert isinstance(data, memoryview) and np.shares_memory(np.asarray(data), image)
    client.close()
