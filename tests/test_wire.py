"""advgrpo.reward_server.wire: the server's copy-free request parser gives exactly what protobuf gives."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from advgrpo.common.errors import InvalidArgument
from advgrpo.common.images import decode_image
from advgrpo.reward.v1 import reward_pb2
from advgrpo.reward_server import wire

ScoreRequest, UpdateRequest = reward_pb2.ScoreRequest, reward_pb2.UpdateDiscriminatorRequest


def bits(value):
    """Floats by their bits, so NaN weights compare equal to themselves."""
    return struct.pack("<d", value) if isinstance(value, float) else value


def as_dict(msg, descriptor) -> dict:
    """The fields of a generated message or a wire-parsed one, in comparable form."""
    out = {}
    for fd in descriptor.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            out[fd.name] = {k: bits(v) for k, v in value.items()}
        elif fd.message_type is not None and fd.is_repeated:
            out[fd.name] = [as_dict(v, fd.message_type) for v in value]
        elif fd.message_type is not None:
            out[fd.name] = as_dict(value, fd.message_type)
        elif fd.type == fd.TYPE_BYTES:
            out[fd.name] = bytes(value)
        else:
            out[fd.name] = bits(value)
    return out


def random_images(rng: random.Random, n: int) -> list[reward_pb2.Image]:
    images = []
    for _ in range(n):
        h, w = rng.randint(0, 300), rng.randint(0, 9)
        image = reward_pb2.Image(
            encoding=rng.choice([0, 1, 2, 3, 7, -5]),  # open enum: unknown values are kept
            height=h,
            width=w,
            data=rng.randbytes(rng.choice([0, 1, h * w * 3])),
        )
        if rng.random() < 0.3:
            image.shared_memory.name = rng.choice(["", "advgrpo-1-a"])
            image.shared_memory.offset = rng.choice([0, 64, 2**40])
            image.shared_memory.size = rng.choice([0, h * w * 3])
        images.append(image)
    return images


def random_groups(rng: random.Random, n_groups: int) -> list[reward_pb2.ImageGroup]:
    groups = []
    for g in range(n_groups):
        images = random_images(rng, rng.randint(0, 4))
        references = random_images(rng, rng.choice([0, 0, 1, 3]))  # ImageGroup.references
        prompt = rng.choice(["", "a cat", 'a sign saying "OPEN"', "ünïcødé “quotes” 猫", "x" * 200])
        groups.append(
            reward_pb2.ImageGroup(
                group_id=rng.choice(["", f"g{g}"]), prompt=prompt, images=images, references=references
            )
        )
    return groups


def random_requests(seed: int, count: int):
    rng = random.Random(seed)
    for i in range(count):
        if i % 2:
            yield ScoreRequest(
                groups=random_groups(rng, rng.randint(0, 3)),
                weights={
                    k: rng.choice([0.0, 1.0, -2.5, 1e-30, float("inf")])
                    for k in rng.sample(["dino", "ocr", "pickscore", "ü"], rng.randint(0, 3))
                },
                min_versions={
                    k: rng.choice([0, 1, 300, 2**63, 2**64 - 1])
                    for k in rng.sample(["dino", "pickscore", "ü"], rng.randint(0, 2))
                },
            )
        else:
            yield UpdateRequest(
                model=rng.choice(["", "dino", "pickscore"]),
                references=random_groups(rng, rng.randint(0, 2)),
                generated=random_groups(rng, rng.randint(0, 2)),
                steps=rng.choice([0, 1, 5, 2**32 - 1]),
                update_id=rng.choice(["", "abc123"]),
            )


def test_parses_every_field_as_protobuf_does():
    for request in random_requests(seed=0, count=200):
        cls = type(request)
        data = request.SerializeToString()
        parsed = wire.parse(cls, data)
        assert not isinstance(parsed, cls), "the fast path should handle well-formed messages"
        assert as_dict(parsed, cls.DESCRIPTOR) == as_dict(cls.FromString(data), cls.DESCRIPTOR)


def test_image_data_is_a_view_of_the_received_bytes():
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    request = ScoreRequest(
        groups=[
            reward_pb2.ImageGroup(
                prompt="p",
                images=[reward_pb2.Image(encoding=1, height=4, width=5, data=pixels.tobytes())],
                references=[reward_pb2.Image(encoding=1, height=4, width=5, data=pixels[::-1].tobytes())],
            )
        ]
    )
    data = request.SerializeToString()
    parsed = wire.parse(ScoreRequest, data)
    for what, want in (("images", pixels), ("references", pixels[::-1])):  # references: like images
        image = getattr(parsed.groups[0], what)[0]
        assert isinstance(image.data, memoryview) and image.data.obj is data
        decoded = decode_image(image, f"groups[0].{what}[0]")
        np.testing.assert_array_equal(decoded, want)
        assert np.shares_memory(decoded, np.frombuffer(data, np.uint8))  # no copy on the way


def test_unknown_fields_are_skipped_like_protobuf():
    base = next(random_requests(seed=1, count=1)).SerializeToString()
    unknown = (
        bytes([(9 << 3) | 0])
        + b"\x96\x01"  # varint
        + bytes([(10 << 3) | 1])
        + struct.pack("<d", 1.5)  # fixed64
        + bytes([(11 << 3) | 2, 3])
        + b"abc"  # length-delimited
        + bytes([(12 << 3) | 5])
        + struct.pack("<f", 2.5)  # fixed32
    )
    for data in (unknown + base, base + unknown):
        parsed = wire.parse(UpdateRequest, data)
        assert not isinstance(parsed, UpdateRequest)
        assert as_dict(parsed, UpdateRequest.DESCRIPTOR) == as_dict(
            UpdateRequest.FromString(data), UpdateRequest.DESCRIPTOR
        )


def test_repeated_singular_fields_last_one_wins_and_map_keys_too():
    data = (
        UpdateRequest(model="first", steps=3).SerializeToString()
        + UpdateRequest(model="second", steps=4).SerializeToString()
    )
    assert wire.parse(UpdateRequest, data).model == "second" == UpdateRequest.FromString(data).model
    data = (
        ScoreRequest(weights={"dino": 1.0}).SerializeToString()
        + ScoreRequest(weights={"dino": 2.0}).SerializeToString()
    )
    assert wire.parse(ScoreRequest, data).weights == {"dino": 2.0} == dict(ScoreRequest.FromString(data).weights)


def test_an_absent_submessage_reads_as_empty_and_a_repeated_one_merges():
    plain = wire.parse(
        ScoreRequest, ScoreRequest(groups=[reward_pb2.ImageGroup(images=[reward_pb2.Image()])]).SerializeToString()
    )
    shm = plain.groups[0].images[0].shared_memory
    assert (shm.name, shm.offset, shm.size) == ("", 0, 0)
    # shared_memory sent twice (name, then offset): protobuf merges the two; so does parse.
    first = reward_pb2.Image(shared_memory=reward_pb2.SharedMemorySlice(name="advgrpo-x")).SerializeToString()
    second = reward_pb2.Image(shared_memory=reward_pb2.SharedMemorySlice(offset=8)).SerializeToString()
    image = first + second
    group = bytes([0x1A, len(image)]) + image
    data = bytes([0x0A, len(group)]) + group
    merged = wire.parse(ScoreRequest, data).groups[0].images[0].shared_memory
    assert (merged.name, merged.offset) == ("advgrpo-x", 8)


def test_what_the_fast_path_declines_protobuf_decides():
    # A known field with another wire type (height sent as a length-delimited field): protobuf
    # keeps it as an unknown field; the result must be protobuf's.
    image = b"\x08\x01" + bytes([(2 << 3) | 2, 1]) + b"x" + b"\x18\x02"
    group = b"\x12\x01p" + bytes([0x1A, len(image)]) + image
    data = bytes([0x0A, len(group)]) + group
    parsed = wire.parse(ScoreRequest, data)
    assert isinstance(parsed, ScoreRequest)  # protobuf's own parse
    assert parsed.groups[0].images[0].width == 2 and parsed.groups[0].images[0].height == 0
    # Invalid UTF-8 in a string field: refused by protobuf, so INVALID_ARGUMENT.
    with pytest.raises(DecodeError):
        ScoreRequest.FromString(b"\x0a\x03\x12\x01\xff")
    with pytest.raises(InvalidArgument, match="advgrpo.reward.v1.ScoreRequest"):
        wire.parse(ScoreRequest, b"\x0a\x03\x12\x01\xff")


def test_malformed_bytes_fail_exactly_when_protobuf_fails():
    """Truncations and byte flips of valid requests: the same verdict as protobuf, every time."""
    rng = random.Random(7)
    verdicts = {"both_ok": 0, "both_refused": 0}
    for request in random_requests(seed=3, count=60):
        cls = type(request)
        data = request.SerializeToString()
        for _ in range(20):
            mutated = bytearray(data)
            if rng.random() < 0.5 and mutated:
                del mutated[rng.randrange(len(mutated)) :]
            for _ in range(rng.randint(1, 3)):
                if mutated:
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            mutated = bytes(mutated)
            try:
                expected = as_dict(cls.FromString(mutated), cls.DESCRIPTOR)
            except DecodeError:
                expected = None
            try:
                got = as_dict(wire.parse(cls, mutated), cls.DESCRIPTOR)
            except InvalidArgument:
                got = None
            assert got == expected, mutated.hex()
            verdicts["both_ok" if expected is not None else "both_refused"] += 1
    assert verdicts["both_ok"] > 50 and verdicts["both_refused"] > 50  # both kinds were exercised


def test_unsupported_schemas_are_refused_when_built():
    with pytest.raises(TypeError, match="rewards"):
        wire._Schema(reward_pb2.GroupScores.DESCRIPTOR)  # repeated float: may be packed
