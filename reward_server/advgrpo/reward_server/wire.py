"""Parses the image-carrying requests (ScoreRequest, UpdateDiscriminatorRequest) without copying
the pixels.

protobuf's parser copies every ``bytes`` field into its arena and again into a Python ``bytes``
on access: two copies of every 12 MB group. Here each ``Image.data`` is a memoryview into the
buffer gRPC received, and ``decode_image`` wraps it in an array without a copy.

The fast path handles the wire format these messages are written in (varint, length-delimited
and fixed-width fields, unknown fields skipped); the schemas come from the generated descriptors,
so they cannot drift from the .proto. Anything it does not handle (a field with an unexpected
wire type, a deprecated group, malformed bytes) goes to protobuf's own parser, which decides:
the result either way is what protobuf would give, or INVALID_ARGUMENT when protobuf refuses it.
The parsed objects have the same attribute names as the generated classes (``groups``,
``images``, ``data``, ...); repeated fields are lists, maps are dicts, and an absent submessage
is an empty one.
"""

from __future__ import annotations

import struct
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from advgrpo.common.errors import InvalidArgument
from advgrpo.reward.v1 import reward_pb2

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MASK64 = (1 << 64) - 1
_F = FieldDescriptor


class _Unhandled(Exception):
    """Something the fast path leaves to protobuf (which may accept or refuse it)."""


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# field type -> (wire type, converter of the raw value, default)
_SCALARS = {
    _F.TYPE_UINT32: (_VARINT, lambda v: v & 0xFFFFFFFF, 0),
    _F.TYPE_UINT64: (_VARINT, lambda v: v, 0),
    _F.TYPE_INT32: (_VARINT, _int32, 0),
    _F.TYPE_ENUM: (_VARINT, _int32, 0),  # proto3 enums are open: unknown values are kept
    _F.TYPE_INT64: (_VARINT, _int64, 0),
    _F.TYPE_BOOL: (_VARINT, bool, False),
    _F.TYPE_FLOAT: (_FIXED32, None, 0.0),
    _F.TYPE_DOUBLE: (_FIXED64, None, 0.0),
}


class _Field:
    __slots__ = ("name", "kind", "wire_type", "convert", "repeated", "schema", "default")

    def __init__(self, fd: FieldDescriptor):
        self.name = fd.name
        self.repeated = fd.is_repeated
        self.schema: _Schema | None = None
        self.convert = None
        if fd.type == _F.TYPE_MESSAGE:
            self.schema = _Schema(fd.message_type)
            if fd.message_type.GetOptions().map_entry:
                self.kind = "map"
            else:
                self.kind = "message" if self.repeated else "submessage"
            # An absent submessage reads as an empty one, as in protobuf (shared: never mutated).
            self.wire_type, self.default = _LEN, None if self.repeated else self.schema.new()
        elif fd.type in (_F.TYPE_STRING, _F.TYPE_BYTES):
            if self.repeated:
                raise TypeError(f"{fd.full_name}: repeated strings are not supported by the fast parser")
            self.kind = "string" if fd.type == _F.TYPE_STRING else "bytes"
            self.wire_type, self.default = _LEN, "" if fd.type == _F.TYPE_STRING else b""
        elif fd.type in _SCALARS and not self.repeated:  # repeated scalars may be packed: not here
            self.kind = "scalar"
            self.wire_type, self.convert, self.default = _SCALARS[fd.type]
        else:
            raise TypeError(f"{fd.full_name}: field type {fd.type} is not supported by the fast parser")


class _Schema:
    def __init__(self, descriptor: Descriptor):
        self.name = descriptor.full_name
        self.fields = {fd.number: _Field(fd) for fd in descriptor.fields}
        names = tuple(f.name for f in self.fields.values())
        self.cls = type(descriptor.name, (_WireMessage,), {"__slots__": names, "_names": names})
        self.map_entry = descriptor.GetOptions().map_entry

    def new(self) -> "_WireMessage":
        obj = self.cls.__new__(self.cls)
        for f in self.fields.values():
            setattr(obj, f.name, {} if f.kind == "map" else [] if f.repeated else f.default)
        return obj


class _WireMessage:
    """A parsed message: plain attributes named like the generated class's fields."""

    __slots__ = ()
    _names: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._names)})"


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Unhandled
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result > _MASK64:
                raise _Unhandled
            return result, pos
        shift += 7


def _skip(buf: memoryview, pos: int, end: int, wire_type: int) -> int:
    if wire_type == _VARINT:
        return _varint(buf, pos, end)[1]
    if wire_type == _FIXED64:
        pos += 8
    elif wire_type == _FIXED32:
        pos += 4
    elif wire_type == _LEN:
        n, pos = _varint(buf, pos, end)
        pos += n
    else:  # groups (deprecated) and invalid wire types
        raise _Unhandled
    if pos > end:
        raise _Unhandled
    return pos


def _parse(schema: _Schema, buf: memoryview, pos: int, end: int) -> _WireMessage:
    obj = schema.new()
    fields = schema.fields
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        f = fields.get(number)
        if f is None:
            # upb moves a map entry with unknown fields out of the map: protobuf decides that.
            if number == 0 or number >= 1 << 29 or schema.map_entry:
                raise _Unhandled
            pos = _skip(buf, pos, end, wire_type)
            continue
        if wire_type != f.wire_type:
            raise _Unhandled
        if wire_type == _LEN:
            n, pos = _varint(buf, pos, end)
            stop = pos + n
            if stop > end:
                raise _Unhandled
            if f.kind == "bytes":
                value: Any = buf[pos:stop]  # a view: no copy
            elif f.kind == "string":
                try:
                    value = str(buf[pos:stop], "utf-8")
                except UnicodeDecodeError:
                    raise _Unhandled from None
            else:
                value = _parse(f.schema, buf, pos, stop)
            pos = stop
            if f.kind == "message":
                getattr(obj, f.name).append(value)
                continue
            if f.kind == "map":
                getattr(obj, f.name)[value.key] = value.value
                continue
            if f.kind == "submessage" and getattr(obj, f.name) is not f.default:
                raise _Unhandled  # a second occurrence merges into the first: protobuf does that
        elif wire_type == _VARINT:
            raw, pos = _varint(buf, pos, end)
            value = f.convert(raw)
        elif wire_type == _FIXED32:
            if pos + 4 > end:
                raise _Unhandled
            (value,) = struct.unpack_from("<f", buf, pos)
            pos += 4
        else:
            if pos + 8 > end:
                raise _Unhandled
            (value,) = struct.unpack_from("<d", buf, pos)
            pos += 8
        setattr(obj, f.name, value)  # singular fields: the last occurrence wins, as in protobuf
    return obj


_SCHEMAS: dict[type, _Schema] = {
    cls: _Schema(cls.DESCRIPTOR) for cls in (reward_pb2.ScoreRequest, reward_pb2.UpdateDiscriminatorRequest)
}


def parse(message_type: type, data: bytes) -> Any:
    """``data`` (a serialised ``message_type``) as an object with the message's fields, its bytes
    fields viewing ``data``; protobuf's parse where the fast path declines; INVALID_ARGUMENT
    naming the message type when protobuf cannot parse it either."""
    buf = memoryview(data).cast("B")
    try:
        return _parse(_SCHEMAS[message_type], buf, 0, len(buf))
    except _Unhandled:
        return parse_plain(message_type, buf)


def parse_plain(message_type: type, data: bytes) -> Any:
    """``data`` parsed by protobuf alone (small messages without images): INVALID_ARGUMENT naming
    the message type when it is not one, rather than gRPC's own deserialiser's UNKNOWN."""
    try:
        return message_type.FromString(bytes(data))
    except DecodeError as exc:
        raise InvalidArgument(
            f"request: not a valid {message_type.DESCRIPTOR.full_name} ({len(data)} bytes): {exc}"
        ) from None
