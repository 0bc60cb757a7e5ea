"""Bounded fuzz campaign: malformed requests and image payloads against a real reward server.

``python -m bench.fuzz [--inputs N] [--seed S] [--out FILE]`` starts a ``--preset noop`` server
(loopback, gRPC only) and sends it N inputs, one at a time; then a ``--preset tiny`` server (the
real small models, OCR included) and N // 10 image payloads, so that decoded images also go
through real models. Inputs go round robin over categories, each drawn from its own
``random.Random`` seeded by (seed, phase, index): the same seed gives the same inputs, and one
input can be rebuilt alone (``make_case``).

* raw_protobuf: random, structured-garbage or mutated bytes sent as the serialised request of
  every RPC (Score, ScoreStream, UpdateDiscriminator, ListModels, CheckSharedMemory) through a
  raw channel method (no serialiser);
* typed_message: well-typed messages with random fields (encodings out of range, sizes, NaN and
  unknown weights, steps past the limit, shared-memory names and slices);
* png_bomb / jpeg_bomb: small files whose headers declare huge sizes, IDAT or zTXt streams that
  inflate to far more than the image, blank images past the request's decoded-bytes budget;
* truncated_image, mutated_image (CRCs fixed half the time, so that PNG decoders get past them),
  random_image_bytes, huge_raw (huge declared height/width for RAW_RGB8), odd_image (valid files
  of unusual modes and sizes), shared_memory (slices of a real segment the campaign writes).

What must hold, whatever the input: every call ends with a status within its deadline (a timeout
is a failure); the status is OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND or
FAILED_PRECONDITION (and the one an input is sure to get where there is one: a declared side past
server.max_image_side is refused, INVALID_ARGUMENT or RESOURCE_EXHAUSTED depending on which check
meets it first, a request past the budget RESOURCE_EXHAUSTED);
INTERNAL or UNKNOWN is a server bug, recorded with the input and the server's log lines it caused.
Afterwards the server process is alive, its health SERVING, a fixed well-formed request scores
exactly as it did before the first input, and no model's version moved (the tiny phase's updates
ask for more steps than allowed, refused only after their images are decoded). Writes JSON
(inputs and statuses per category, the violations, wall time, machine); exits 0 only if all of it
holds.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image as PILImage

from advgrpo.common.shared_memory import SHM_DIR
from advgrpo.reward.v1 import reward_pb2
from advgrpo.reward_server.config import ServerSettings

from .common import REPO, ServerProcess, machine_info

DEFAULT_OUT = REPO / "bench" / "results" / "fuzz.json"
SERVICE = "/advgrpo.reward.v1.RewardService/"
METHODS = ("Score", "ScoreStream", "UpdateDiscriminator", "ListModels", "CheckSharedMemory")
# A deliberate answer to a bad input; INTERNAL and UNKNOWN are bugs, DEADLINE_EXCEEDED a hang,
# UNAVAILABLE a dead (or dying) server.
ALLOWED = frozenset({"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND", "FAILED_PRECONDITION"})
_DEFAULTS = ServerSettings()
MAX_SIDE = _DEFAULTS.max_image_side
BUDGET = _DEFAULTS.max_request_decoded_bytes
MAX_STEPS = _DEFAULTS.max_update_steps
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
RAW, PNG, JPEG = reward_pb2.ENCODING_RAW_RGB8, reward_pb2.ENCODING_PNG, reward_pb2.ENCODING_JPEG
PROMPT = 'a sign that says "fuzz"'
SEGMENT_BYTES = 64 << 10
RECORDED_PER_KIND = 5  # violations of one kind (method, status, message) recorded with their bytes and log
# A malformed input is INVALID_ARGUMENT; one past a limit (a side, the decoded-bytes budget) may be
# either of INVALID_ARGUMENT or RESOURCE_EXHAUSTED (a side past the limit has been both).
IA, RE = frozenset({"INVALID_ARGUMENT"}), frozenset({"RESOURCE_EXHAUSTED"})
REFUSED = IA | RE

NOOP_SCHEDULE = (
    ("raw_protobuf",) * 3
    + ("typed_message",) * 2
    + ("png_bomb", "jpeg_bomb", "truncated_image", "mutated_image", "random_image_bytes", "huge_raw", "odd_image")
    + ("shared_memory",)
)
TINY_SCHEDULE = (
    "png_bomb", "jpeg_bomb", "truncated_image", "mutated_image", "random_image_bytes", "huge_raw", "odd_image",
)  # fmt: skip


@dataclass
class Case:
    category: str
    method: str
    payload: bytes | list[bytes]  # ScoreStream: one serialised ScoreRequest per message
    note: str  # what the input is, in words
    expect: frozenset[str] | None = None  # the status it is sure to get, where there is one


@dataclass
class Context:
    """What the inputs of one phase may refer to."""

    phase: str  # "noop" | "tiny"
    models: tuple[str, ...]  # the server's model names
    trainable: str | None  # a trainable model ("dino" in tiny)
    reference_models: tuple[str, ...]  # models that need each group's references
    segment: str | None  # a shared-memory segment name holding SEGMENT_BYTES (None: no /dev/shm)
    segment_bytes: bytes = b""


# ---------------------------------------------------------------- calls


@dataclass
class Outcome:
    code: str
    details: str
    responses: list[bytes]


class RawCaller:
    """Every RPC of RewardService as a raw-bytes call: the payload goes on the wire as it is."""

    def __init__(self, target: str, timeout_s: float):
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self._unary = {
            m: self.channel.unary_unary(SERVICE + m, request_serializer=None, response_deserializer=None)
            for m in METHODS
            if m != "ScoreStream"
        }
        self._stream = self.channel.stream_stream(
            SERVICE + "ScoreStream", request_serializer=None, response_deserializer=None
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def call(self, method: str, payload: bytes | list[bytes]) -> Outcome:
        try:
            if method == "ScoreStream":
                responses = list(self._stream(iter(list(payload)), timeout=self.timeout_s))
            else:
                responses = [self._unary[method](bytes(payload), timeout=self.timeout_s)]
        except grpc.RpcError as exc:
            return Outcome(exc.code().name, exc.details() or "", [])
        return Outcome("OK", "", responses)

    def health(self) -> str:
        try:
            answer = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def close(self) -> None:
        self.channel.close()


# ---------------------------------------------------------------- images


def random_picture(rng: random.Random, h: int, w: int) -> np.ndarray:
    """A gradient plus noise: compresses like a picture, not like a constant."""
    g = np.random.default_rng(rng.getrandbits(32))
    y, x = np.mgrid[0:h, 0:w]
    base = (x[..., None] * g.uniform(0, 255 / max(w, 1), 3) + y[..., None] * g.uniform(0, 255 / max(h, 1), 3)) % 256
    return np.clip(base + g.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(arr: np.ndarray | PILImage.Image, fmt: str, **kwargs) -> bytes:
    pil = arr if isinstance(arr, PILImage.Image) else PILImage.fromarray(arr)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_declaring(
    width: int, height: int, idat: bytes = b"", bit_depth: int = 8, color_type: int = 2, interlace: int = 0
) -> bytes:
    """A PNG whose header says width x height, whatever its IDAT holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def fix_png_crcs(data: bytes) -> bytes:
    """Recomputes every chunk's CRC (as far as the chunk structure holds), so that a mutated PNG
    gets past the CRC check into the decoder."""
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        (n,) = struct.unpack_from(">I", out, pos)
        end = pos + 8 + n
        if end + 4 > len(out):
            break
        struct.pack_into(">I", out, end, zlib.crc32(bytes(out[pos + 4 : end])))
        pos = end + 4
    return bytes(out)


def jpeg_declaring(jpeg: bytes, height: int, width: int) -> bytes:
    """The JPEG with its frame header (SOF) saying height x width, its scan data unchanged."""
    out, pos = bytearray(jpeg), 2
    while pos + 4 <= len(out) and out[pos] == 0xFF:
        marker = out[pos + 1]
        (n,) = struct.unpack_from(">H", out, pos + 2)
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", out, pos + 5, height, width)
            return bytes(out)
        pos += 2 + n
    raise ValueError("no SOF marker")


@lru_cache(maxsize=16)
def blank_png(height: int, width: int) -> bytes:
    """A black RGB PNG: every row filter byte 0 and zeros, at zlib level 9 (~1000:1)."""
    raw = bytes(height * (1 + width * 3))
    return png_declaring(width, height, zlib.compress(raw, 9))


@lru_cache(maxsize=16)
def blank_jpeg(height: int, width: int) -> bytes:
    return encode(PILImage.new("RGB", (width, height)), "JPEG", quality=50)


@lru_cache(maxsize=2)
def inflating_idat_png(inflated: int) -> bytes:
    """A 64x64 PNG whose IDAT inflates to ``inflated`` bytes (the image needs 12 KiB of them)."""
    return png_declaring(64, 64, zlib.compress(bytes(inflated), 9))


@lru_cache(maxsize=2)
def ztxt_bomb_png(inflated: int) -> bytes:
    """A valid 16x16 PNG with a zTXt chunk that inflates to ``inflated`` bytes, before its IDAT."""
    base = encode(np.zeros((16, 16, 3), np.uint8), "PNG")
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * inflated, 9))
    at = 8 + 25  # after the signature and IHDR
    return base[:at] + ztxt + base[at:]


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


INTERESTING_VARINTS = (0, 1, 127, 128, 4096, 4097, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


def mutate(rng: random.Random, data: bytes, n: int | None = None) -> bytes:
    """``data`` after 1 to 8 random edits: bit flips, inserted bytes or varints, deleted or
    duplicated spans, boundary values, a cut."""
    out = bytearray(data)
    for _ in range(n or rng.randint(1, 8)):
        op = rng.randrange(8)
        pos = rng.randrange(len(out) + 1)
        if op in (0, 1) and pos < len(out):
            out[pos] ^= 1 << rng.randrange(8)
        elif op == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            del out[pos : pos + rng.randint(1, 16)]
        elif op == 4 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start : start + rng.randint(1, 64)]
        elif op == 5 and pos < len(out):
            out[pos] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
        elif op == 6:
            out[pos:pos] = varint(rng.choice(INTERESTING_VARINTS))
        elif op == 7 and rng.random() < 0.3:
            del out[pos:]
    return bytes(out)


def _sizes(rng: random.Random, small: bool = False) -> tuple[int, int]:
    """A random (height, width) within the aspect-ratio limit (16:1)."""
    h = rng.choice((1, 2, 3, 7, 16, 31, 64)) if small or rng.random() < 0.7 else rng.randint(1, 160)
    w = max(1, min(h * 16, rng.randint(max(1, -(-h // 16)), max(1, h * 4))))
    return (h, w) if rng.random() < 0.5 else (w, h)


def valid_file(rng: random.Random, fmt: str | None = None, side_max: int = 96) -> tuple[str, bytes]:
    """A valid PNG or JPEG of a random picture, random size and settings: (format, bytes)."""
    fmt = fmt or rng.choice(("PNG", "JPEG"))
    h, w = rng.randint(1, side_max), rng.randint(1, side_max)
    w = max(-(-h // 16), min(w, h * 16))
    arr = random_picture(rng, h, w)
    if fmt == "PNG":
        return fmt, encode(arr, "PNG", compress_level=rng.randint(0, 9))
    return fmt, encode(arr, "JPEG", quality=rng.randint(1, 100), progressive=rng.random() < 0.3)


def odd_file(rng: random.Random) -> tuple[str, bytes, str]:
    """A valid PNG/JPEG in an unusual mode or size: (format, bytes, description)."""
    h, w = _sizes(rng, small=rng.random() < 0.5)
    pil = PILImage.fromarray(random_picture(rng, h, w))
    if rng.random() < 0.5:
        mode = rng.choice(("1", "L", "LA", "P", "PA", "RGBA", "I;16", "I", "RGB"))
        try:
            img = pil.convert("L").convert(mode) if mode.startswith("I") else pil.convert(mode)
            return "PNG", encode(img, "PNG", optimize=rng.random() < 0.3), f"PNG {mode} {h}x{w}"
        except (OSError, ValueError):  # a mode Pillow cannot write as PNG: plain RGB
            return "PNG", encode(pil, "PNG"), f"PNG RGB {h}x{w}"
    mode = rng.choice(("RGB", "L", "CMYK"))
    kwargs = {"quality": rng.randint(1, 100), "progressive": rng.random() < 0.5, "subsampling": rng.choice((0, 1, 2))}
    if mode == "L":
        kwargs.pop("subsampling")
    return "JPEG", encode(pil.convert(mode), "JPEG", **kwargs), f"JPEG {mode} {h}x{w} {kwargs}"


def image(encoding: int, data: bytes = b"", height: int = 0, width: int = 0, **kwargs) -> reward_pb2.Image:
    return reward_pb2.Image(encoding=encoding, data=data, height=height, width=width, **kwargs)


def good_image(rng: random.Random) -> reward_pb2.Image:
    h, w = rng.choice(((8, 8), (16, 24), (32, 32)))
    return image(RAW, random_picture(rng, h, w).tobytes(), h, w)


# ---------------------------------------------------------------- image payloads
# Each returns (images, note, expect): the images to put in one request (one, or a bomb
# repeated), what they are, and the status a Score of them is sure to get (None: any allowed).

ImagePayload = tuple[list[reward_pb2.Image], str, "frozenset[str] | None"]


def png_bomb(rng: random.Random, ctx: Context) -> ImagePayload:
    kind = rng.randrange(6)
    if kind == 0:  # a header declaring a side past the limit, a few bytes of data
        w = rng.choice((MAX_SIDE + 1, 65535, 1 << 20, 2**31 - 1, 2**32 - 1, rng.randint(MAX_SIDE + 1, 2**31)))
        h = rng.choice((1, 64, MAX_SIDE, w))
        w, h = (w, h) if rng.random() < 0.5 else (h, w)
        idat = zlib.compress(bytes(rng.randint(0, 4096)))
        return (
            [image(PNG, png_declaring(w, h, idat, color_type=rng.choice((0, 2, 6))))],
            f"PNG declaring {h}x{w}",
            REFUSED,
        )
    if kind == 1:  # blank images of a legal size, past the request's decoded-bytes budget together
        h, w = rng.choice(((MAX_SIDE, MAX_SIDE), (2048, 4096), (1024, 1024), (4096, 256)))
        n = BUDGET // (h * w * 3) + 1 + rng.randint(0, 2)
        data = blank_png(h, w)
        return [image(PNG, data)] * n, f"{n} blank {h}x{w} PNGs ({len(data)} bytes each) past the budget", RE
    if kind == 2:  # a blank image of a legal size, decoded (tiny phase: at most 512² for the models' sake)
        sides = ((512, 512), (64, 1024)) if ctx.phase == "tiny" else ((MAX_SIDE, MAX_SIDE), (2048, 2048), (256, 4096))
        h, w = rng.choice(sides)
        return [image(PNG, blank_png(h, w))], f"a blank {h}x{w} PNG (legal, decoded)", None
    if kind == 3:  # a 64x64 image whose IDAT inflates to 64 MiB
        return [image(PNG, inflating_idat_png(64 << 20))], "64x64 PNG, IDAT inflating to 64 MiB", None
    if kind == 4:  # a zTXt text chunk inflating to 64 MiB, in the header Pillow reads first
        return [image(PNG, ztxt_bomb_png(64 << 20))], "16x16 PNG, zTXt chunk inflating to 64 MiB", None
    # a legal size declared, next to no data: the decoder runs out
    h, w = rng.choice(((MAX_SIDE, MAX_SIDE), (1024, 1024), (300, 200)))
    idat = zlib.compress(bytes(rng.randint(0, 1000)))
    return [image(PNG, png_declaring(w, h, idat), h, w)], f"PNG declaring {h}x{w}, {len(idat)} bytes of IDAT", None


def jpeg_bomb(rng: random.Random, ctx: Context) -> ImagePayload:
    kind = rng.randrange(5)
    _, small = valid_file(rng, "JPEG", side_max=32)
    if kind == 0:  # a frame header past the limit (JPEG holds up to 65535)
        h, w = rng.choice((MAX_SIDE + 1, 65535, rng.randint(MAX_SIDE + 1, 65535))), rng.choice((1, 64, 65535))
        h, w = (h, w) if rng.random() < 0.5 else (w, h)
        return [image(JPEG, jpeg_declaring(small, h, w))], f"JPEG declaring {h}x{w}", REFUSED
    if kind == 1:  # a legal size declared over a tiny scan
        h, w = rng.choice(((MAX_SIDE, MAX_SIDE), (1024, 2048), (500, 40)))
        if ctx.phase == "tiny":
            h, w = min(h, 512), min(w, 512)
        return [image(JPEG, jpeg_declaring(small, h, w))], f"JPEG declaring {h}x{w} over a small scan", None
    if kind == 2:  # blank legal images past the budget together
        h, w = rng.choice(((MAX_SIDE, MAX_SIDE), (2048, 2048)))
        n = BUDGET // (h * w * 3) + 1 + rng.randint(0, 2)
        return [image(JPEG, blank_jpeg(h, w))] * n, f"{n} blank {h}x{w} JPEGs past the budget", RE
    if kind == 3:  # a blank legal image, decoded
        h, w = (512, 512) if ctx.phase == "tiny" else rng.choice(((MAX_SIDE, MAX_SIDE), (2048, 2048)))
        return [image(JPEG, blank_jpeg(h, w))], f"a blank {h}x{w} JPEG (legal, decoded)", None
    # height 0 in the frame header (to be defined by a DNL marker that never comes)
    return [image(JPEG, jpeg_declaring(small, 0, rng.choice((1, 64, 4096))))], "JPEG declaring height 0", None


def truncated_image(rng: random.Random, ctx: Context) -> ImagePayload:
    fmt, data = valid_file(rng)
    cut = rng.choice((0, rng.randint(1, 40), rng.randrange(len(data)), len(data) - rng.randint(1, 12)))
    cut = max(0, min(cut, len(data) - 1))
    enc = PNG if fmt == "PNG" else JPEG
    return [image(enc, data[:cut])], f"{fmt} of {len(data)} bytes cut to {cut}", IA if cut == 0 else None


def mutated_image(rng: random.Random, ctx: Context) -> ImagePayload:
    fmt, data = valid_file(rng)
    data = mutate(rng, data)
    fixed = fmt == "PNG" and rng.random() < 0.5
    if fixed:
        data = fix_png_crcs(data)
    enc = PNG if fmt == "PNG" else JPEG
    return [image(enc, data)], f"mutated {fmt}{' (CRCs fixed)' if fixed else ''}", None


def random_image_bytes(rng: random.Random, ctx: Context) -> ImagePayload:
    enc = rng.choice((PNG, JPEG, RAW))
    n = rng.choice((0, 1, rng.randint(2, 64), rng.randint(65, 4096)))
    data = rng.randbytes(n)
    if enc != RAW and rng.random() < 0.5:  # past the magic number, into the header parser
        data = (PNG_SIGNATURE if enc == PNG else JPEG_SOI) + data
    h = w = 0
    if enc == RAW:
        h, w = rng.choice(((0, 0), (1, max(1, n // 3)), _sizes(rng)))
    expect = IA if not data or (enc == RAW and len(data) != h * w * 3) else None
    if enc == RAW and (h == 0 or w == 0 or max(h, w) > 16 * min(h, w)):
        expect = IA
    if enc == RAW and max(h, w) > MAX_SIDE:
        expect = REFUSED
    return [image(enc, data, h, w)], f"{len(data)} random bytes as {reward_pb2.Encoding.Name(enc)} {h}x{w}", expect


def huge_raw(rng: random.Random, ctx: Context) -> ImagePayload:
    sides = (0, 1, MAX_SIDE, MAX_SIDE + 1, 65535, 65536, 2**31 - 1, 2**32 - 1, rng.randint(0, 2**32 - 1))
    h, w = rng.choice(sides), rng.choice(sides)
    exact, wrapped = h * w * 3, h * w * 3 % 2**32
    # nothing, a little, the exact size where it is small, the size a uint32 product wraps to
    n = rng.choice(
        (0, 3, rng.randint(0, 1 << 14), exact if exact <= 1 << 16 else 0, wrapped if wrapped <= 1 << 16 else 1)
    )
    data = bytes(n)
    legal = 0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE and max(h, w) <= 16 * min(h, w) and n == h * w * 3
    return [image(RAW, data, h, w)], f"RAW declaring {h}x{w} with {n} bytes", None if legal else REFUSED


def odd_image(rng: random.Random, ctx: Context) -> ImagePayload:
    fmt, data, what = odd_file(rng)
    return [image(PNG if fmt == "PNG" else JPEG, data)], what, None


IMAGE_PAYLOADS: dict[str, Callable[[random.Random, Context], ImagePayload]] = {
    "png_bomb": png_bomb,
    "jpeg_bomb": jpeg_bomb,
    "truncated_image": truncated_image,
    "mutated_image": mutated_image,
    "random_image_bytes": random_image_bytes,
    "huge_raw": huge_raw,
    "odd_image": odd_image,
}


def wrap_images(rng: random.Random, ctx: Context, category: str, payload: ImagePayload) -> Case:
    """The payload's images in a request: mostly Score, else ScoreStream or UpdateDiscriminator
    (on tiny: of its trainable model, with steps past the limit, so refused after decoding)."""
    images, note, expect = payload
    group = reward_pb2.ImageGroup(group_id=f"fuzz-{category}", prompt=PROMPT)
    fuzz_at_reference = False
    if len(images) == 1 and rng.random() < 0.3:  # company: a well-formed image in the same group
        group.images.extend([good_image(rng)] + images if rng.random() < 0.5 else images + [good_image(rng)])
    else:
        group.images.extend(images)
    roll = rng.random()
    if roll < 0.7:
        weights = {}
        if ctx.phase == "tiny":
            chosen = rng.sample(ctx.models, rng.randint(1, len(ctx.models)))
            weights = {m: 1.0 for m in chosen}
            if any(m in ctx.reference_models for m in chosen):
                if len(images) == 1 and rng.random() < 0.5:  # the fuzzed image as the group's reference
                    fuzz_at_reference = True
                    del group.images[:]
                    group.images.append(good_image(rng))
                    group.references.extend(images)
                else:
                    group.references.append(good_image(rng))
        request = reward_pb2.ScoreRequest(groups=[group], weights=weights)
        where = " (as the group's reference)" if fuzz_at_reference else ""
        return Case(category, "Score", request.SerializeToString(), note + where, expect)
    if roll < 0.85:
        good = reward_pb2.ScoreRequest(
            groups=[reward_pb2.ImageGroup(group_id="ok", prompt=PROMPT, images=[good_image(rng)])]
        )
        messages = [reward_pb2.ScoreRequest(groups=[group]).SerializeToString()]
        if rng.random() < 0.5:
            messages.insert(0, good.SerializeToString())
        return Case(category, "ScoreStream", messages, f"{note} (stream of {len(messages)})", expect)
    other = reward_pb2.ImageGroup(prompt=PROMPT, images=[good_image(rng)])
    refs, gens = ([group], [other]) if rng.random() < 0.5 else ([other], [group])
    model = ctx.trainable or ctx.models[0]
    request = reward_pb2.UpdateDiscriminatorRequest(
        model=model, references=refs, generated=gens, steps=MAX_STEPS + 1, update_id="fuzz"
    )
    # A non-trainable model is refused before decoding (FAILED_PRECONDITION); steps past the
    # limit after it: an update of these images never trains.
    return Case(category, "UpdateDiscriminator", request.SerializeToString(), f"{note} (update of {model!r})")


# ---------------------------------------------------------------- messages


def random_text(rng: random.Random, max_len: int = 40) -> str:
    alphabet = rng.choice(("abc", "advgrpo-0123456789", "dino noop ocr pickscore", "ÿ€😀\u200b\t\n\"'\\/.."))
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


def random_name(rng: random.Random, ctx: Context) -> str:
    return rng.choice((*ctx.models, "", "nope", "dino", "noop", random_text(rng, 12)))


def random_float(rng: random.Random) -> float:
    return rng.choice((0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), -float("inf"), 3.4e38, 1e-45, rng.gauss(0, 10)))


def random_slice(rng: random.Random, ctx: Context) -> reward_pb2.SharedMemorySlice:
    names = (
        "", "advgrpo-", "advgrpo-does-not-exist", "advgrpo-..", "advgrpo-../../etc/passwd", "../etc/passwd",
        "/dev/shm/advgrpo-x", "advgrpo-a\x00b", "advgrpo-" + "a" * 300, "psm_other", random_text(rng, 20),
    )  # fmt: skip
    name = ctx.segment if ctx.segment and rng.random() < 0.6 else rng.choice(names)
    big = (2**63 - 1, 2**63, 2**64 - 1, SEGMENT_BYTES, SEGMENT_BYTES + 1)
    offset = rng.choice((0, 0, 4096, rng.randrange(SEGMENT_BYTES), *big))
    size = rng.choice((0, 1, 48, 16 * 16 * 3, rng.randrange(SEGMENT_BYTES), *big))
    return reward_pb2.SharedMemorySlice(name=name, offset=offset, size=size)


def random_image_msg(rng: random.Random, ctx: Context, shm: float = 0.1) -> reward_pb2.Image:
    enc = rng.choice((RAW, RAW, PNG, JPEG, 0, 4, 2**31 - 1, -1))
    h, w = rng.choice(((0, 0), (1, 1), (8, 8), (16, 16), (4, 70), (70, 4), (MAX_SIDE + 1, 8), _sizes(rng)))
    roll = rng.random()
    if roll < 0.4:
        data = bytes(h * w * 3)  # the right size for RAW
    elif roll < 0.6:
        data = valid_file(rng, side_max=32)[1]
    else:
        data = rng.randbytes(rng.randint(0, 300))
    msg = image(enc, data, h, w)
    if rng.random() < shm:
        msg.shared_memory.CopyFrom(random_slice(rng, ctx))
        if rng.random() < 0.8:
            msg.data = b""
    return msg


def random_group(rng: random.Random, ctx: Context) -> reward_pb2.ImageGroup:
    return reward_pb2.ImageGroup(
        group_id=random_text(rng),
        prompt=random_text(rng, 200),
        images=[random_image_msg(rng, ctx) for _ in range(rng.choice((0, 1, 1, 2, 4)))],
        references=[random_image_msg(rng, ctx) for _ in range(rng.choice((0, 0, 1, 2)))],
    )


def random_score_request(rng: random.Random, ctx: Context) -> reward_pb2.ScoreRequest:
    weights = {random_name(rng, ctx): random_float(rng) for _ in range(rng.choice((0, 0, 1, 2)))}
    return reward_pb2.ScoreRequest(
        groups=[random_group(rng, ctx) for _ in range(rng.choice((0, 1, 1, 2, 3)))], weights=weights
    )


def random_update_request(rng: random.Random, ctx: Context) -> reward_pb2.UpdateDiscriminatorRequest:
    model = random_name(rng, ctx)
    if ctx.trainable is not None and model == ctx.trainable:
        model = "nope"  # never train: scores must come out the same at the end
    return reward_pb2.UpdateDiscriminatorRequest(
        model=model,
        references=[random_group(rng, ctx) for _ in range(rng.choice((0, 1, 2)))],
        generated=[random_group(rng, ctx) for _ in range(rng.choice((0, 1, 2)))],
        steps=rng.choice((0, 1, MAX_STEPS, MAX_STEPS + 1, 2**32 - 1)),
        update_id=random_text(rng),
    )


def random_check_request(rng: random.Random, ctx: Context) -> reward_pb2.CheckSharedMemoryRequest:
    slice_ = random_slice(rng, ctx)
    roll = rng.random()
    if roll < 0.3 and ctx.segment:  # the bytes that are there: readable
        n = rng.randint(1, 64)
        offset = rng.randrange(SEGMENT_BYTES - n)
        slice_ = reward_pb2.SharedMemorySlice(name=ctx.segment, offset=offset, size=n)
        expected = ctx.segment_bytes[offset : offset + n]
    elif roll < 0.6:
        expected = rng.randbytes(max(0, min(int(slice_.size), 64)))
    else:
        expected = rng.randbytes(rng.choice((0, 1, 64, 65, 1000)))
    return reward_pb2.CheckSharedMemoryRequest(slice=slice_, expected=expected)


def typed_request(rng: random.Random, ctx: Context, method: str) -> bytes:
    if method in ("Score", "ScoreStream"):
        return random_score_request(rng, ctx).SerializeToString()
    if method == "UpdateDiscriminator":
        return random_update_request(rng, ctx).SerializeToString()
    if method == "CheckSharedMemory":
        return random_check_request(rng, ctx).SerializeToString()
    return reward_pb2.ListModelsRequest().SerializeToString()


def garbage_fields(rng: random.Random, depth: int = 0) -> bytes:
    """Protobuf-shaped garbage: fields of random numbers (0, huge, known) and wire types (groups
    and the invalid 6 and 7 included), lengths that lie, nested messages."""
    out = bytearray()
    for _ in range(rng.randint(1, 6)):
        number = rng.choice((0, 1, 2, 3, 4, 5, 15, 16, 2**29 - 1, 2**29, rng.randint(1, 2000)))
        wire = rng.choice((0, 1, 2, 2, 2, 3, 4, 5, 6, 7))
        out += varint((number << 3) | wire)
        if wire == 0:
            out += varint(rng.choice(INTERESTING_VARINTS))
        elif wire == 1:
            out += rng.randbytes(rng.choice((8, 8, 3)))
        elif wire == 5:
            out += rng.randbytes(rng.choice((4, 4, 2)))
        elif wire == 2:
            body = (
                garbage_fields(rng, depth + 1)
                if depth < 4 and rng.random() < 0.5
                else rng.randbytes(rng.randint(0, 40))
            )
            n = rng.choice((len(body), len(body), len(body) + rng.randint(1, 100), max(0, len(body) - 1), 2**63))
            out += varint(n) + body
    return bytes(out)


def raw_protobuf(rng: random.Random, ctx: Context) -> Case:
    method = rng.choice(METHODS)

    def one() -> tuple[bytes, str]:
        roll = rng.random()
        if roll < 0.3:
            return rng.randbytes(rng.choice((0, 1, 2, rng.randint(3, 32), rng.randint(33, 512)))), "random bytes"
        if roll < 0.55:
            return garbage_fields(rng), "protobuf-shaped garbage"
        if roll < 0.65:  # deep nesting: the recursion limit of protobuf's parser
            depth = rng.choice((50, 101, 1000))
            body = b""
            for _ in range(depth):
                body = b"\x0a" + varint(len(body)) + body
            return body, f"{depth} nested messages"
        base = typed_request(rng, ctx, method)
        if method == "ListModels" and rng.random() < 0.5:
            base = garbage_fields(rng)
        return mutate(rng, base), "mutated valid request"

    if method == "ScoreStream":
        parts = [one() for _ in range(rng.randint(1, 3))]
        return Case("raw_protobuf", method, [p for p, _ in parts], "stream of " + ", ".join(n for _, n in parts))
    payload, note = one()
    return Case("raw_protobuf", method, payload, note)


def typed_message(rng: random.Random, ctx: Context) -> Case:
    method = rng.choice(("Score", "Score", "ScoreStream", "UpdateDiscriminator", "CheckSharedMemory", "ListModels"))
    if method == "ScoreStream":
        payload: bytes | list[bytes] = [typed_request(rng, ctx, method) for _ in range(rng.randint(1, 3))]
    else:
        payload = typed_request(rng, ctx, method)
    return Case("typed_message", method, payload, f"random well-typed {method} request")


def shared_memory_case(rng: random.Random, ctx: Context) -> Case:
    """Images read from the campaign's segment: PNG at 0, JPEG at 4096, anything elsewhere."""
    if rng.random() < 0.25:
        return Case("shared_memory", "CheckSharedMemory", random_check_request(rng, ctx).SerializeToString(), "check")
    msgs = [random_image_msg(rng, ctx, shm=1.0) for _ in range(rng.randint(1, 3))]
    if ctx.segment and rng.random() < 0.6:  # a slice that holds an image, declared right or wrong
        if rng.random() < 0.6:
            del msgs[1:]
        enc, offset, size = rng.choice(((PNG, 0, 4096), (JPEG, 4096, 4096), (RAW, 8192, 16 * 16 * 3)))
        h, w = (16, 16) if enc == RAW or rng.random() < 0.5 else _sizes(rng)
        msgs[0] = image(
            enc, b"", h, w, shared_memory=reward_pb2.SharedMemorySlice(name=ctx.segment, offset=offset, size=size)
        )
    group = reward_pb2.ImageGroup(group_id="shm", prompt=PROMPT, images=msgs)
    return Case("shared_memory", "Score", reward_pb2.ScoreRequest(groups=[group]).SerializeToString(), "slices")


def segment_contents(seed: int) -> bytes:
    """What the campaign writes to its segment: a PNG at 0, a JPEG at 4096, random bytes around."""
    rng = random.Random(f"{seed}/segment")
    out = bytearray(rng.randbytes(SEGMENT_BYTES))
    png = encode(random_picture(rng, 16, 16), "PNG")
    jpeg = encode(random_picture(rng, 16, 16), "JPEG")
    out[: len(png)] = png
    out[4096 : 4096 + len(jpeg)] = jpeg
    return bytes(out)


def make_case(seed: int, phase: str, index: int, ctx: Context) -> Case:
    """Input ``index`` of ``phase``: the same for the same seed, whatever came before it."""
    rng = random.Random(f"{seed}/{phase}/{index}")
    schedule = NOOP_SCHEDULE if phase == "noop" else TINY_SCHEDULE
    category = schedule[index % len(schedule)]
    if category == "raw_protobuf":
        return raw_protobuf(rng, ctx)
    if category == "typed_message":
        return typed_message(rng, ctx)
    if category == "shared_memory":
        return shared_memory_case(rng, ctx)
    return wrap_images(rng, ctx, category, IMAGE_PAYLOADS[category](rng, ctx))


# ---------------------------------------------------------------- a phase


def well_formed_request(models: tuple[str, ...], reference_models: tuple[str, ...]) -> reward_pb2.ScoreRequest:
    """A fixed request every model scores: RAW, PNG and JPEG images, references for those that need them."""
    rng = random.Random("well-formed")
    groups = []
    for g in range(2):
        imgs = [good_image(rng)]
        imgs.append(image(PNG, encode(random_picture(rng, 24, 40), "PNG")))
        imgs.append(image(JPEG, encode(random_picture(rng, 40, 24), "JPEG", quality=90)))
        groups.append(reward_pb2.ImageGroup(group_id=f"g{g}", prompt=PROMPT, images=imgs, references=[good_image(rng)]))
    return reward_pb2.ScoreRequest(groups=groups, weights={m: 1.0 for m in models})


def _hex(payload: bytes | list[bytes], limit: int = 4096) -> str | list[str]:
    if isinstance(payload, list):
        return [_hex(p, limit) for p in payload]
    return payload[:limit].hex() + ("..." if len(payload) > limit else "")


def _size(payload: bytes | list[bytes]) -> int:
    return sum(map(len, payload)) if isinstance(payload, list) else len(payload)


def _sha256(payload: bytes | list[bytes]) -> str:
    h = hashlib.sha256()
    for p in payload if isinstance(payload, list) else [payload]:
        h.update(p)
    return h.hexdigest()


def run_phase(phase: str, inputs: int, seed: int, workdir: Path, log: Callable[[str], None]) -> dict:
    """One server of ``phase``'s preset, ``inputs`` inputs against it, the checks after."""
    args = ["--preset", phase]
    timeout_s = 30.0 if phase == "noop" else 120.0
    log_path = workdir / f"server-{phase}.log"
    started = time.monotonic()
    server = ServerProcess(args, http=False, log_file=log_path, timeout_s=180)
    segment_path: Path | None = None
    caller = RawCaller(server.target, timeout_s)
    codes: dict[str, Counter] = defaultdict(Counter)
    methods: dict[str, Counter] = defaultdict(Counter)
    violations: list[dict] = []
    kinds: Counter = Counter()
    tried = 0
    try:
        listed = reward_pb2.ListModelsResponse.FromString(caller.call("ListModels", b"").responses[0])
        models = tuple(m.name for m in listed.models)
        trainable = next((m.name for m in listed.models if m.trainable), None)
        reference_models = tuple(m.name for m in listed.models if m.kind == "dino_similarity")
        versions_before = {m.name: m.version for m in listed.models}
        segment = None
        segment_bytes = b""
        if SHM_DIR.is_dir():
            segment = f"advgrpo-fuzz-{server.pid}-{seed}"
            segment_path = SHM_DIR / segment
            segment_bytes = segment_contents(seed)
            segment_path.write_bytes(segment_bytes)
        ctx = Context(phase, models, trainable, reference_models, segment, segment_bytes)
        well_formed = well_formed_request(models, reference_models).SerializeToString()
        before = caller.call("Score", well_formed)
        if before.code != "OK":
            raise RuntimeError(
                f"{phase}: the well-formed request failed before fuzzing: {before.code} {before.details}"
            )
        log(f"{phase}: server ready in {time.monotonic() - started:.1f}s, models {list(models)}; {inputs} inputs")
        dead = False
        with open(log_path, errors="replace") as server_log:
            server_log.read()  # only what the inputs cause from here
            for index in range(inputs):
                case = make_case(seed, phase, index, ctx)
                t0 = time.monotonic()
                outcome = caller.call(case.method, case.payload)
                elapsed = time.monotonic() - t0
                tried += 1
                codes[case.category][outcome.code] += 1
                methods[case.method][outcome.code] += 1
                problem = None
                if outcome.code == "DEADLINE_EXCEEDED":
                    problem = f"no answer within {timeout_s:g}s (a hang)"
                elif outcome.code not in ALLOWED:
                    problem = f"status {outcome.code}"
                elif case.expect is not None and outcome.code not in case.expect:
                    problem = f"status {outcome.code}, expected {'/'.join(sorted(case.expect))}"
                lines = server_log.read()
                if problem is not None:
                    dead = server.proc.poll() is not None
                    kind = f"{case.method} {outcome.code}: {outcome.details[:160]}"
                    kinds[kind] += 1
                    full = kinds[kind] <= RECORDED_PER_KIND  # the bytes and log of the first few of a kind
                    violations.append(
                        {
                            "kind": kind,
                            "phase": phase,
                            "seed": seed,
                            "index": index,
                            "category": case.category,
                            "method": case.method,
                            "input": case.note,
                            "problem": problem + (" (the server died)" if dead else ""),
                            "code": outcome.code,
                            "details": outcome.details[:2000],
                            "seconds": round(elapsed, 3),
                            "payload_bytes": _size(case.payload),
                            "payload_sha256": _sha256(case.payload),
                            **({"payload_hex": _hex(case.payload), "server_log": lines[-6000:]} if full else {}),
                        }
                    )
                    if full:
                        log(f"{phase} #{index} {case.category}/{case.method}: {problem}: {outcome.details[:200]}")
                    if dead:
                        break
                if index and index % 500 == 0:
                    log(f"{phase}: {index} inputs, {len(violations)} violations")
        alive = server.proc.poll() is None
        health = caller.health() if alive else "DEAD"
        after = caller.call("Score", well_formed) if alive else Outcome("UNAVAILABLE", "server died", [])
        listed_after = caller.call("ListModels", b"")
        versions_after = (
            {m.name: m.version for m in reward_pb2.ListModelsResponse.FromString(listed_after.responses[0]).models}
            if listed_after.code == "OK"
            else {}
        )
        same = after.code == "OK" and (
            reward_pb2.ScoreResponse.FromString(after.responses[0])
            == reward_pb2.ScoreResponse.FromString(before.responses[0])
        )
        return {
            "preset": phase,
            "inputs_tried": tried,
            "inputs_per_category": {c: sum(n.values()) for c, n in sorted(codes.items())},
            "status_codes_per_category": {c: dict(sorted(n.items())) for c, n in sorted(codes.items())},
            "status_codes_per_method": {m: dict(sorted(n.items())) for m, n in sorted(methods.items())},
            "server_alive": alive,
            "health": health,
            "well_formed_scores_unchanged": bool(same),
            "well_formed_rewards": [
                list(g.rewards) for g in reward_pb2.ScoreResponse.FromString(before.responses[0]).groups
            ],
            "model_versions_unchanged": versions_after == versions_before,
            "model_versions": versions_after,
            "violation_kinds": dict(kinds.most_common()),
            "violations": violations,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        caller.close()
        server.stop()
        if segment_path is not None:
            segment_path.unlink(missing_ok=True)


def run(inputs: int = 2000, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """The campaign: ``inputs`` inputs against a noop server, ``inputs // 10`` image payloads
    against a tiny one. Returns the JSON-able result; ``requirements_met`` says whether all held."""
    log = log or (lambda line: None)
    started = time.monotonic()
    phases = {}
    with tempfile.TemporaryDirectory(prefix="advgrpo-fuzz-") as tmp:
        phases["noop"] = run_phase("noop", inputs, seed, Path(tmp), log)
        if inputs // 10:
            phases["tiny"] = run_phase("tiny", inputs // 10, seed, Path(tmp), log)
    violations = [v for p in phases.values() for v in p["violations"]]
    kinds: Counter = Counter()
    for p in phases.values():
        kinds.update(p["violation_kinds"])
    codes: Counter = Counter()
    for p in phases.values():
        for per in p["status_codes_per_category"].values():
            codes.update(per)
    checks = {
        "every_input_answered_in_time": all("hang" not in v["problem"] for v in violations),
        "only_deliberate_statuses": not violations,
        "server_alive": all(p["server_alive"] for p in phases.values()),
        "health_serving": all(p["health"] == "SERVING" for p in phases.values()),
        "well_formed_scores_unchanged": all(p["well_formed_scores_unchanged"] for p in phases.values()),
        "model_versions_unchanged": all(p["model_versions_unchanged"] for p in phases.values()),
    }
    m = machine_info()
    return {
        "seed": seed,
        "inputs_requested": inputs,
        "inputs_tried": sum(p["inputs_tried"] for p in phases.values()),
        "allowed_codes": sorted(ALLOWED),
        "status_codes": dict(sorted(codes.items())),
        "phases": phases,
        "violations_total": len(violations),
        "violation_kinds": dict(kinds.most_common()),
        "checks": checks,
        "requirements_met": all(checks.values()),
        "wall_s": round(time.monotonic() - started, 1),
        "machine": {"cpu_model": m["cpu_model"], "cpu_cores": m["cpu_cores"], "cpu_affinity": m["cpu_affinity"],
                    "os": m["os"], "python": m["python"], "grpcio": m["grpcio"], "date": m["date"]},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=2000, help="inputs against the noop server (tiny: a tenth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    args = p.parse_args(argv)
    if args.inputs < 1:
        p.error("--inputs: must be >= 1")
    result = run(args.inputs, args.seed, log=lambda line: print(line, file=sys.stderr, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, phase in result["phases"].items():
        print(f"{name}: {phase['inputs_tried']} inputs in {phase['seconds']}s")
        for category, per in phase["status_codes_per_category"].items():
            print(f"  {category:20s} {sum(per.values()):5d}  " + ", ".join(f"{c} {n}" for c, n in per.items()))
    for check, ok in result["checks"].items():
        print(f"{check}: {'yes' if ok else 'NO'}")
    print(
        f"{result['inputs_tried']} inputs, {result['violations_total']} violations, {result['wall_s']}s -> {args.out}"
    )
    return 0 if result["requirements_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
