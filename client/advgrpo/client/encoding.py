"""Images as the client sends them, and the requests that carry them, written straight to
protobuf's wire format.

Score, ScoreStream and UpdateDiscriminator carry the images. Building a ScoreRequest message
copies every image into it and SerializeToString copies it again; ``ScoreBatch`` and
``UpdateBatch`` keep the encoded groups (raw pixels as views of the caller's arrays) and write
the request with one ``bytes.join``, so the pixels are copied once. What they write parses as the
same message (tests/test_client.py checks it against protobuf). The few other fields the client
writes or reads by hand (the health check's, advgrpo.client.health) use the helpers here too.
"""

from __future__ import annotations

import logging
import numbers
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from advgrpo.client.types import Group
from advgrpo.common.images import RAW, encode_image_parts

log = logging.getLogger(__name__)

FIELD_OVERHEAD = 16  # bytes of tags and lengths per image / group, generously


# ---------------------------------------------------------------- images


EncodedImage = tuple[int, int, int, Any]  # (encoding, height, width, data: bytes-like or SharedRef)


@dataclass
class EncodedGroup:
    """A group as it goes on the wire: ``index``, its position in the caller's sequence.
    ``references``: ImageGroup.references, encoded like the images; a group that has them is
    never split (advgrpo.client.packing)."""

    index: int
    group_id: str
    prompt: str
    images: list[EncodedImage]
    references: list[EncodedImage] = field(default_factory=list)

    def head_bytes(self) -> int:
        """An upper bound of the serialised ImageGroup's size without its images and references."""
        return len(self.group_id.encode()) + len(self.prompt.encode()) + 2 * FIELD_OVERHEAD

    def nbytes(self) -> int:
        """An upper bound of the serialised ImageGroup's size."""
        return self.head_bytes() + sum(len(data) + FIELD_OVERHEAD for *_, data in self.images + self.references)

    def image_count(self) -> int:
        """Images the server counts toward ``max_images_per_request``: references included."""
        return len(self.images) + len(self.references)

    def with_images(self, fn: Callable[[EncodedImage], EncodedImage]) -> "EncodedGroup":
        """This group with ``fn`` applied to each image, then to each reference, in order."""
        images = [fn(image) for image in self.images]
        return EncodedGroup(self.index, self.group_id, self.prompt, images, [fn(ref) for ref in self.references])

    def add_to(self, groups) -> None:
        """Appends this group to a repeated ImageGroup field (images set in place, no extra copy)."""
        g = groups.add(group_id=self.group_id, prompt=self.prompt)
        for field_, images in ((g.images, self.images), (g.references, self.references)):
            for encoding, height, width, data in images:
                field_.add(encoding=encoding, height=height, width=width, data=bytes(data))


def encode_group(group: Group, index: int, encoding: str) -> EncodedGroup:
    """``group``'s images and references encoded (``encoding``: "raw", "png" or "jpeg"); raw RGB8
    pixels stay views of the caller's uint8 arrays where they can. A group without an id gets its
    index."""
    images = [encode_image_parts(img, encoding) for img in group.images]
    refs = [encode_image_parts(img, encoding) for img in group.references]
    return EncodedGroup(index, group.group_id or str(index), group.prompt, images, refs)


def png_parts(encoding: int, height: int, width: int, data) -> tuple[int, int, int, Any]:
    """An encoded image's fields with raw RGB8 pixels as PNG (lossless); others as they are."""
    if encoding != RAW:
        return encoding, height, width, data
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    return encode_image_parts(pixels, "png")


# ---------------------------------------------------------------- protobuf's wire format


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def len_field(number: int, payload_len: int) -> bytes:
    """The tag and length of a length-delimited field (wire type 2)."""
    return varint((number << 3) | 2) + varint(payload_len)


def string_field(number: int, value: str) -> bytes:
    """A string field; proto3 leaves an empty one out."""
    raw = value.encode()
    return len_field(number, len(raw)) + raw if raw else b""


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``data[pos:]`` and the position after it; ValueError if it is cut short."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def read_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a serialised message, in order: varints
    as ints, length-delimited fields as bytes, fixed32/fixed64 as their little-endian ints.
    ValueError on anything malformed (a deserializer's failure fails the call)."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = read_varint(data, pos)
        elif wire_type == 2:
            size, pos = read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated length-delimited field")
            value, pos = bytes(data[pos : pos + size]), pos + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if pos + size > len(data):
                raise ValueError("truncated fixed-size field")
            value, pos = int.from_bytes(data[pos : pos + size], "little"), pos + size
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if number == 0:
            raise ValueError("field number 0")
        yield number, wire_type, value


@dataclass(frozen=True)
class SharedRef:
    """An image's bytes in a shared-memory segment: Image.shared_memory instead of Image.data."""

    name: str
    offset: int
    size: int

    def serialize(self) -> bytes:
        """Image field 5, a SharedMemorySlice."""
        body = string_field(1, self.name)
        body += (b"\x10" + varint(self.offset)) if self.offset else b""
        body += (b"\x18" + varint(self.size)) if self.size else b""
        return len_field(5, len(body)) + body


def group_chunks(number: int, g: EncodedGroup) -> list:
    """An ImageGroup as field ``number`` of its parent, in wire format: tags and lengths as bytes,
    the image data as given (bytes or views of the caller's arrays), for one ``bytes.join``."""
    head = b""
    if g.group_id:
        gid = g.group_id.encode()
        head += len_field(1, len(gid)) + gid
    if g.prompt:
        prompt = g.prompt.encode()
        head += len_field(2, len(prompt)) + prompt
    body: list = [head]
    for field_number, images in ((3, g.images), (4, g.references)):  # ImageGroup.images, .references
        for encoding, height, width, data in images:
            fields = b"".join(
                varint(tag) + varint(value)
                for tag, value in ((0x08, encoding), (0x10, height), (0x18, width))
                if value  # proto3 leaves zero scalars out
            )
            if isinstance(data, SharedRef):
                fields += data.serialize()
                data = b""
            fields += len_field(4, len(data)) if len(data) else b""
            body += [len_field(field_number, len(fields) + len(data)), fields, data]
    return [len_field(number, sum(len(b) for b in body)), *body]


MAX_VERSION = (1 << 64) - 1  # ScoreRequest.min_versions' values are uint64


def check_min_versions(min_versions: Mapping[str, int] | None, argument: str = "min_versions") -> dict[str, int]:
    """``min_versions`` (model name -> least version the server may score with) as the request
    carries it; ValueError naming ``argument`` for a name that is not a non-empty string or a
    version that is not an integer in 0..2**64-1."""
    if min_versions is None:
        return {}
    if not isinstance(min_versions, Mapping):
        raise ValueError(f"{argument}: expected a mapping of model name -> version, got {type(min_versions).__name__}")
    out: dict[str, int] = {}
    for name, version in min_versions.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{argument}: model names must be non-empty strings, got {name!r}")
        if isinstance(version, bool) or not isinstance(version, numbers.Integral) or not 0 <= version <= MAX_VERSION:
            raise ValueError(f"{argument}[{name!r}]: a version is an integer >= 0, got {version!r}")
        out[name] = int(version)
    return out


@dataclass
class ScoreBatch:
    """A ScoreRequest as encoded groups, serialised by hand in protobuf's wire format.
    ``min_versions``: ScoreRequest.min_versions (model -> least version to score with)."""

    groups: list[EncodedGroup]
    weights: dict[str, float]
    min_versions: dict[str, int] = field(default_factory=dict)

    def serialize(self) -> bytes:
        chunks: list = []
        for g in self.groups:
            chunks += group_chunks(1, g)
        for key, value in self.weights.items():
            entry = string_field(1, key) + b"\x15" + struct.pack("<f", value)
            chunks.append(len_field(2, len(entry)) + entry)
        for key, version in self.min_versions.items():  # a map entry: key (1) string, value (2) varint
            entry = string_field(1, key) + b"\x10" + varint(version)
            chunks.append(len_field(3, len(entry)) + entry)
        return b"".join(chunks)

    def all_groups(self) -> list[EncodedGroup]:
        return self.groups

    def with_groups(self, groups: list[EncodedGroup]) -> "ScoreBatch":
        """The same request with ``groups`` (as many, in ``all_groups``' order) in place of its own."""
        return ScoreBatch(groups, self.weights, self.min_versions)


@dataclass
class UpdateBatch:
    """An UpdateDiscriminatorRequest, serialised by hand like ``ScoreBatch``."""

    model: str
    references: list[EncodedGroup]
    generated: list[EncodedGroup]
    steps: int
    update_id: str

    def serialize(self) -> bytes:
        chunks: list = [string_field(1, self.model)]
        for number, groups in ((2, self.references), (3, self.generated)):
            for g in groups:
                chunks += group_chunks(number, g)
        if self.steps:
            chunks.append(b"\x20" + varint(self.steps))
        chunks.append(string_field(5, self.update_id))
        return b"".join(chunks)

    def nbytes(self) -> int:
        """An upper bound of the serialised request's size."""
        groups = self.references + self.generated
        return len(self.model.encode()) + len(self.update_id.encode()) + 32 + sum(g.nbytes() for g in groups)

    def all_groups(self) -> list[EncodedGroup]:
        return self.references + self.generated

    def with_groups(self, groups: list[EncodedGroup]) -> "UpdateBatch":
        """The same update (same idempotency key) with ``groups`` (references, then generated)."""
        n = len(self.references)
        return UpdateBatch(self.model, groups[:n], groups[n:], self.steps, self.update_id)


def fit_inline(request: ScoreBatch | UpdateBatch, max_message_bytes: int, target: str) -> ScoreBatch | UpdateBatch:
    """``request`` as it can go through the socket. Score requests are packed to fit already
    (advgrpo.client.packing); an update, which cannot be split, has its raw images re-encoded as
    PNG when it would exceed ``max_message_bytes``, and raises ValueError if it is still too large."""
    if not isinstance(request, UpdateBatch) or request.nbytes() <= max_message_bytes:
        return request
    limit, raw_size = max_message_bytes, request.nbytes()
    fix = (
        "pass the images through shared memory (shared_memory=True or 'auto', server on this "
        "host) or raise max_message_bytes on both sides (the client's and the server's "
        "server.max_message_bytes), or send fewer images per update"
    )
    groups = request.all_groups()
    if not any(e == RAW for g in groups for e, *_ in g.images + g.references):
        raise ValueError(
            f"update_discriminator request is {raw_size} bytes, over the message limit of "
            f"{limit} bytes (max_message_bytes): {fix}"
        )
    t0 = time.perf_counter()
    fitted = request.with_groups([g.with_images(lambda image: png_parts(*image)) for g in groups])
    size = fitted.nbytes()
    if size > limit:
        raise ValueError(
            f"update_discriminator request is {raw_size} bytes with raw images and {size} bytes as "
            f"PNG, over the message limit of {limit} bytes (max_message_bytes): {fix}"
        )
    log.info(
        "reward server %s: update_discriminator's raw images (%.1f MB) exceed the %.1f MB message "
        "limit; sent as PNG instead (lossless, %.1f MB, encoded in %.2fs)",
        target,
        raw_size / 1e6,
        limit / 1e6,
        size / 1e6,
        time.perf_counter() - t0,
    )
    return fitted
