"""A small decoder of serialized ``tf.train.Example`` records, without TensorFlow.

The messages (tensorflow/core/example/{example,feature}.proto)::

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }   // entries {key = 1; value = 2}
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                             Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

Protocol-buffer wire format (protobuf.dev/programming-guides/encoding): each
field is a varint key ``(number << 3) | wire_type`` and a value: type 0 a
varint, 1 eight bytes, 2 a varint length and that many bytes, 5 four bytes.
Repeated numbers may come packed (one length-delimited run) or one per field;
a parser must accept both. Unknown fields are skipped.
"""

from __future__ import annotations

import numpy as np


class DecodeError(ValueError):
    """The bytes are not a well-formed ``tf.train.Example``."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint longer than 10 bytes")


def _fields(buf: bytes):
    """Yield ``(number, wire_type, value)``: an int for types 0, 1 and 5, bytes for type 2."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise DecodeError(f"field {number}: length {n} runs past the end")
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            if pos + 4 > end:
                raise DecodeError(f"field {number}: truncated 32-bit value")
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == 1:
            if pos + 8 > end:
                raise DecodeError(f"field {number}: truncated 64-bit value")
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        else:
            raise DecodeError(f"field {number}: unsupported wire type {wire}")
        yield number, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _floats(buf: bytes) -> np.ndarray:
    out: list[np.ndarray] = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == 2:  # packed
            if len(value) % 4:
                raise DecodeError("packed float list length is not a multiple of 4")
            out.append(np.frombuffer(value, "<f4"))
        elif wire == 5:
            out.append(np.array([value], "<u4").view("<f4"))
        else:
            raise DecodeError(f"float list value with wire type {wire}")
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _int64s(buf: bytes) -> np.ndarray:
    out: list[int] = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == 2:  # packed varints
            pos = 0
            while pos < len(value):
                v, pos = _varint(value, pos)
                out.append(_signed64(v))
        elif wire == 0:
            out.append(_signed64(value))
        else:
            raise DecodeError(f"int64 list value with wire type {wire}")
    return np.array(out, np.int64)


def _bytes_list(buf: bytes) -> list[bytes]:
    out = []
    for number, wire, value in _fields(buf):
        if number == 1:
            if wire != 2:
                raise DecodeError(f"bytes list value with wire type {wire}")
            out.append(bytes(value))
    return out


def _feature(buf: bytes) -> np.ndarray | list[bytes]:
    value: np.ndarray | list[bytes] = np.zeros(0, np.float32)
    for number, wire, v in _fields(buf):
        if wire != 2:
            continue
        if number == 1:
            value = _bytes_list(v)
        elif number == 2:
            value = _floats(v)
        elif number == 3:
            value = _int64s(v)
    return value


def parse_example(data: bytes) -> dict[str, np.ndarray | list[bytes]]:
    """``{feature name: float32 array | int64 array | list of bytes}`` of one record.

    Raises:
      DecodeError: the bytes are not a well-formed ``tf.train.Example``.
    """
    data = bytes(data)
    out: dict[str, np.ndarray | list[bytes]] = {}
    for number, wire, features in _fields(data):
        if number != 1 or wire != 2:
            continue
        for n2, w2, entry in _fields(features):
            if n2 != 1 or w2 != 2:
                continue
            key, value = None, b""
            for n3, w3, v in _fields(entry):
                if n3 == 1 and w3 == 2:
                    key = bytes(v).decode("utf-8", errors="replace")
                elif n3 == 2 and w3 == 2:
                    value = v
            if key is None:
                raise DecodeError("a feature map entry has no key")
            out[key] = _feature(value)
    return out
