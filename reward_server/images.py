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

from advgrpo.reward.v1 import reward_pb2

from .errors import InvalidArgument
from .shared_memory import SharedMemoryReader, read_shared

RAW = reward_pb2.ENCODING_RAW_RGB8
PNG = reward_pb2.ENCODING_PNG
JPEG = reward_pb2.ENCODING_JPEG
_ENCODINGS = {"raw": RAW, "png": PNG, "jpeg": JPEG, RAW: RAW, PNG: PNG, JPEG: JPEG}
_PIL_FORMATS = {PNG: "PNG", JPEG: "JPEG"}

DEFAULT_MAX_SIDE = 4096


def decode_image(
    msg: reward_pb2.Image, where: str, max_side: int = DEFAULT_MAX_SIDE, shm: SharedMemoryReader | None = None
) -> np.ndarray:
    """Decodes one ``Image`` message to a uint8 [H, W, 3] array; raises InvalidArgument naming ``where``.

    The bytes are ``msg.data`` or, when ``msg.shared_memory`` names a segment, read through
    ``shm`` (None: this server does not read shared memory)."""
    enc = msg.encoding
    if enc == RAW:
        h, w = msg.height, msg.width
        _check_dims(h, w, where, max_side)
        expected = h * w * 3
        data = _image_bytes(msg, where, shm)
        if len(data) != expected:
            raise InvalidArgument(
                f"{where}: RAW_RGB8 data has {len(data)} bytes, expected height*width*3 = "
                f"{h}*{w}*3 = {expected}"
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
    if enc in _PIL_FORMATS:
        name = _PIL_FORMATS[enc]
        data = _image_bytes(msg, where, shm)
        if not len(data):
            raise InvalidArgument(f"{where}: empty {name} data")
        try:
            pil = PILImage.open(io.BytesIO(data), formats=[name])
            w, h = pil.size  # header only: check before decoding the pixels
            _check_dims(h, w, where, max_side)
            pil.load()
            arr = np.asarray(pil.convert("RGB"), dtype=np.uint8)
        except InvalidArgument:
            raise
        except Exception as exc:  # PIL raises many types for corrupt data
            raise InvalidArgument(f"{where}: cannot decode {name} data ({exc})") from None
        if (msg.height and msg.height != arr.shape[0]) or (msg.width and msg.width != arr.shape[1]):
            raise InvalidArgument(
                f"{where}: declared {msg.height}x{msg.width} but the {name} is "
                f"{arr.shape[0]}x{arr.shape[1]}"
            )
        return arr
    raise InvalidArgument(
        f"{where}: encoding must be ENCODING_RAW_RGB8, ENCODING_PNG or ENCODING_JPEG, "
        f"got {reward_pb2.Encoding.Name(enc) if enc in reward_pb2.Encoding.values() else enc}"
    )


def _image_bytes(msg: reward_pb2.Image, where: str, shm: SharedMemoryReader | None):
    ref = msg.shared_memory
    if not ref.name:
        return msg.data
    if len(msg.data):
        raise InvalidArgument(f"{where}: set data or shared_memory, not both")
    return read_shared(shm, ref, where)


def _check_dims(h: int, w: int, where: str, max_side: int) -> None:
    if h == 0 or w == 0:
        raise InvalidArgument(f"{where}: height and width must be positive, got {h}x{w}")
    if h > max_side or w > max_side:
        raise InvalidArgument(f"{where}: {h}x{w} exceeds the maximum side of {max_side} pixels")


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
