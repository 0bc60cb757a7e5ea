"""Image <-> wire conversion, shared by the server (decode, validate) and the client (encode).

Everything inside the server works on uint8 RGB arrays of shape [H, W, 3]. Decoding checks the
declared size against the bytes before anything is allocated, so a bad message costs nothing and
the error names the offending field.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image as PILImage

from advgrpo.common.errors import InvalidArgument, ResourceExhausted
from advgrpo.common.shared_memory import SharedMemoryReader, open_shared, read_shared
from advgrpo.reward.v1 import reward_pb2

RAW = reward_pb2.ENCODING_RAW_RGB8
PNG = reward_pb2.ENCODING_PNG
JPEG = reward_pb2.ENCODING_JPEG
_ENCODINGS = {"raw": RAW, "png": PNG, "jpeg": JPEG, RAW: RAW, PNG: PNG, JPEG: JPEG}
_PIL_FORMATS = {PNG: "PNG", JPEG: "JPEG"}

DEFAULT_MAX_SIDE = 4096
DEFAULT_MAX_ASPECT_RATIO = 16.0


def image_size(
    msg: reward_pb2.Image,
    where: str,
    max_side: int = DEFAULT_MAX_SIDE,
    shm: SharedMemoryReader | None = None,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> tuple[int, int, int]:
    """(height, width, slice bytes) of one ``Image``, checked, before anything is decoded or copied.

    RAW from its fields (and its byte count against them); PNG/JPEG from the image's header (read
    from shared memory as far as the header goes), which the declared height/width, where set, must
    match. ``slice bytes`` is what decoding will copy out of shared memory on top of the pixels: the
    size of a PNG/JPEG slice (0 otherwise). Raises InvalidArgument naming ``where``."""
    enc = msg.encoding
    if enc == RAW:
        h, w = _raw_size(msg, where, max_side, max_aspect_ratio)
        return h, w, 0
    if enc in _PIL_FORMATS:
        name = _PIL_FORMATS[enc]
        ref = msg.shared_memory
        if ref.name:
            _check_one_source(msg, where)
            if not ref.size:
                raise InvalidArgument(f"{where}: empty {name} data")
            with open_shared(shm, ref, where) as fp:
                h, w = _header_size(fp, msg, where, name, max_side, max_aspect_ratio)
            return h, w, int(ref.size)
        if not len(msg.data):
            raise InvalidArgument(f"{where}: empty {name} data")
        h, w = _header_size(io.BytesIO(msg.data), msg, where, name, max_side, max_aspect_ratio)
        return h, w, 0
    raise _bad_encoding(enc, where)


def decode_image(
    msg: reward_pb2.Image,
    where: str,
    max_side: int = DEFAULT_MAX_SIDE,
    shm: SharedMemoryReader | None = None,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decodes one ``Image`` message to a uint8 [H, W, 3] array; raises InvalidArgument naming ``where``.

    The bytes are ``msg.data`` or, when ``msg.shared_memory`` names a segment, read through
    ``shm`` (None: this server does not read shared memory). ``size``: the (height, width)
    ``image_size`` found; a PNG/JPEG whose header now says otherwise (its segment was rewritten
    since) is refused before its pixels are decoded."""
    enc = msg.encoding
    if enc == RAW:
        # _raw_size checked the byte count against the fields; a shared-memory read is exact or raises
        h, w = size if size is not None else _raw_size(msg, where, max_side, max_aspect_ratio)
        return np.frombuffer(_image_bytes(msg, where, shm), dtype=np.uint8).reshape(h, w, 3)
    if enc in _PIL_FORMATS:
        name = _PIL_FORMATS[enc]
        data = _image_bytes(msg, where, shm)
        if not len(data):
            raise InvalidArgument(f"{where}: empty {name} data")
        try:
            pil = PILImage.open(io.BytesIO(data), formats=[name])
            h, w = _checked_size(pil, msg, where, name, max_side, max_aspect_ratio)  # before decoding
            if size is not None and (h, w) != tuple(size):
                raise InvalidArgument(
                    f"{where}: the {name} is {h}x{w} now but was {size[0]}x{size[1]} when the request "
                    f"was checked (its shared-memory segment was rewritten meanwhile)"
                )
            pil.load()
            arr = np.asarray(pil.convert("RGB"), dtype=np.uint8)
        except (InvalidArgument, ResourceExhausted):
            raise
        except Exception as exc:  # PIL raises many types for corrupt data
            raise InvalidArgument(f"{where}: cannot decode {name} data ({exc})") from None
        return arr
    raise _bad_encoding(enc, where)


def _raw_size(msg: reward_pb2.Image, where: str, max_side: int, max_aspect_ratio: float) -> tuple[int, int]:
    """A RAW image's checked height and width; its byte count (inline or the slice's) must match."""
    h, w = msg.height, msg.width
    _check_dims(h, w, where, max_side, max_aspect_ratio)
    ref = msg.shared_memory
    if ref.name:
        _check_one_source(msg, where)
    n = int(ref.size) if ref.name else len(msg.data)
    if n != h * w * 3:
        raise InvalidArgument(
            f"{where}: RAW_RGB8 data has {n} bytes, expected height*width*3 = {h}*{w}*3 = {h * w * 3}"
        )
    return h, w


def _header_size(fp, msg, where: str, name: str, max_side: int, max_aspect_ratio: float) -> tuple[int, int]:
    try:
        pil = PILImage.open(fp, formats=[name])  # reads the header only
        return _checked_size(pil, msg, where, name, max_side, max_aspect_ratio)
    except (InvalidArgument, ResourceExhausted):
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise InvalidArgument(f"{where}: cannot decode {name} data ({exc})") from None


def _checked_size(pil, msg, where: str, name: str, max_side: int, max_aspect_ratio: float) -> tuple[int, int]:
    w, h = pil.size
    _check_dims(h, w, where, max_side, max_aspect_ratio)
    if (msg.height and msg.height != h) or (msg.width and msg.width != w):
        raise InvalidArgument(f"{where}: declared {msg.height}x{msg.width} but the {name} is {h}x{w}")
    return h, w


def _bad_encoding(enc: int, where: str) -> InvalidArgument:
    return InvalidArgument(
        f"{where}: encoding must be ENCODING_RAW_RGB8, ENCODING_PNG or ENCODING_JPEG, "
        f"got {reward_pb2.Encoding.Name(enc) if enc in reward_pb2.Encoding.values() else enc}"
    )


def _check_one_source(msg: reward_pb2.Image, where: str) -> None:
    if len(msg.data):
        raise InvalidArgument(f"{where}: set data or shared_memory, not both")


def _image_bytes(msg: reward_pb2.Image, where: str, shm: SharedMemoryReader | None):
    ref = msg.shared_memory
    if not ref.name:
        return msg.data
    _check_one_source(msg, where)
    return read_shared(shm, ref, where)


def _check_dims(h: int, w: int, where: str, max_side: int, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> None:
    if h == 0 or w == 0:
        raise InvalidArgument(f"{where}: height and width must be positive, got {h}x{w}")
    if h > max_side or w > max_side:  # a limit, like the others: RESOURCE_EXHAUSTED, never to be retried
        raise ResourceExhausted(
            f"{where}: {h}x{w} exceeds the maximum side of {max_side} pixels (server.max_image_side)"
        )
    if max(h, w) > max_aspect_ratio * min(h, w):
        raise InvalidArgument(
            f"{where}: {h}x{w} has an aspect ratio (long side / short side) of {max(h, w) / min(h, w):g}, "
            f"over server.max_aspect_ratio = {max_aspect_ratio:g}"
        )


def to_uint8_hwc(image: Any) -> np.ndarray:
    """Converts a PIL image, a numpy array or a torch tensor to a contiguous uint8 [H, W, 3] array.

    Arrays/tensors may be HWC or CHW; floating point values are taken to be in [0, 1].
    """
    if isinstance(image, PILImage.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if hasattr(image, "detach"):  # torch.Tensor, without importing torch here
        image = image.detach().cpu()
        if image.is_floating_point():
            image = image.float()
        image = image.numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3:
        raise ValueError(f"expected an image of 2 or 3 dimensions, got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[2] != 3:
        raise ValueError(f"expected 1 or 3 channels, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(np.rint(arr * 255.0), 0, 255)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def encode_image_parts(
    image: Any, encoding: str | int = "raw", jpeg_quality: int = 95
) -> tuple[int, int, int, bytes | memoryview]:
    """(encoding, height, width, data) of a PIL image / array / tensor: the fields of an ``Image``,
    without building the message (the client writes them straight into a request, saving copies).
    For raw RGB8, ``data`` is a flat view of the uint8 array, which may share the caller's memory:
    it is copied when the request is serialised."""
    try:
        enc = _ENCODINGS[encoding]
    except KeyError:
        raise ValueError(f"encoding must be one of raw, png, jpeg; got {encoding!r}") from None
    arr = to_uint8_hwc(image)
    h, w = arr.shape[:2]
    if enc == RAW:
        return enc, h, w, memoryview(arr).cast("B")
    buf = io.BytesIO()
    kwargs = {"quality": jpeg_quality} if enc == JPEG else {"compress_level": 1}
    PILImage.fromarray(arr).save(buf, format=_PIL_FORMATS[enc], **kwargs)
    return enc, h, w, buf.getvalue()


def encode_image(image: Any, encoding: str | int = "raw", jpeg_quality: int = 95) -> reward_pb2.Image:
    """Encodes a PIL image / array / tensor as an ``Image`` message (raw RGB8 by default)."""
    enc, h, w, data = encode_image_parts(image, encoding, jpeg_quality)
    return reward_pb2.Image(encoding=enc, height=h, width=w, data=bytes(data))
