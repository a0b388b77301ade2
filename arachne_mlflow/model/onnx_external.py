"""Refuse ONNX models whose external data lies outside their directory, before onnxruntime reads it.

A tensor in an ONNX file may keep its bytes in another file, named by the `location` entry of
its `external_data`. onnxruntime 1.17-1.23 follow that path wherever it points (`../x`,
`/etc/x`) and hand the bytes back through inference; later releases refuse. This check makes
every version behave like the later ones: a location must be a relative path without `..`.

It reads the protobuf wire format itself (devices do not install the `onnx` package), walking
only the messages that can hold a tensor: graphs and their initializers, node attributes
(constants and subgraphs), functions and training graphs. Tensor bytes are skipped, not read:
the file is memory-mapped, so the walk costs time in the number of fields on that path only.
"""

from __future__ import annotations

import mmap
import os
from pathlib import PurePosixPath

from arachne_mlflow.errors import InvalidInputError

# onnx.proto: for each message on the way to a TensorProto, the fields that lead further.
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "training": {1: "graph", 2: "graph"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
_TENSOR_NAME = 8
_MAX_DEPTH = 100  # protobuf's own default recursion limit
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5


def check_external_data(model: str | os.PathLike | bytes) -> None:
    """Raise `InvalidInputError` if a tensor of the ONNX model (a file, or its bytes) has external
    data outside the model's directory, or if the file is not a protobuf message at all."""
    if isinstance(model, bytes):
        _walk(model, 0, len(model), "model", 0, "<bytes>")
        return
    with open(model, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return  # nothing to check; onnxruntime refuses the file
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _walk(data, 0, len(data), "model", 0, os.fspath(model))


def _walk(data: bytes | mmap.mmap, start: int, end: int, kind: str, depth: int, where: str) -> None:
    if depth > _MAX_DEPTH:
        raise _invalid(where, f"messages nested more than {_MAX_DEPTH} deep")
    fields = _SCHEMA[kind]
    name, locations = b"", []
    for number, begin, stop in _fields(data, start, end, where):
        child = fields.get(number)
        if kind == "tensor" and number == _TENSOR_NAME:
            name = bytes(data[begin:stop])
        elif child == "entry":
            entry = {key: bytes(data[b:s]) for key, b, s in _fields(data, begin, stop, where)}
            if entry.get(1) == b"location":
                locations.append(entry.get(2, b""))
        elif child is not None:
            _walk(data, begin, stop, child, depth + 1, where)
    for location in locations:
        _check_location(location, name, where)


def _fields(data: bytes | mmap.mmap, start: int, end: int, where: str):
    """(field number, value start, value end) of each length-delimited field in data[start:end]."""
    position = start
    while position < end:
        number, wire, position = _tag(data, position, end, where)
        if wire == _LENGTH:
            length, position = _varint(data, position, end, where)
            if position + length > end:
                raise _invalid(where, "a field runs past the end of its message")
            yield number, position, position + length
            position += length
        else:
            position = _skip(data, position, end, number, wire, where)


def _skip(data: bytes | mmap.mmap, position: int, end: int, number: int, wire: int, where: str, depth: int = 0) -> int:
    """The position after a field that is not length-delimited (a group is skipped whole, as protobuf does)."""
    if depth > _MAX_DEPTH:
        raise _invalid(where, f"groups nested more than {_MAX_DEPTH} deep")
    if wire == _VARINT:
        return _varint(data, position, end, where)[1]
    if wire in (_FIXED64, _FIXED32):
        position += 8 if wire == _FIXED64 else 4
    elif wire == _START_GROUP:
        while True:
            inner, inner_wire, position = _tag(data, position, end, where)
            if inner_wire == _END_GROUP:
                if inner != number:
                    raise _invalid(where, "a group ends with another field number")
                break
            if inner_wire == _LENGTH:
                length, position = _varint(data, position, end, where)
                position += length
            else:
                position = _skip(data, position, end, inner, inner_wire, where, depth + 1)
    else:
        raise _invalid(where, f"protobuf wire type {wire} where a field starts")
    if position > end:
        raise _invalid(where, "a field runs past the end of its message")
    return position


def _tag(data: bytes | mmap.mmap, position: int, end: int, where: str) -> tuple[int, int, int]:
    tag, position = _varint(data, position, end, where)
    return tag >> 3, tag & 7, position


def _varint(data: bytes | mmap.mmap, position: int, end: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while position < end and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise _invalid(where, "a truncated or overlong varint")


def _invalid(where: str, why: str) -> InvalidInputError:
    return InvalidInputError(f"onnx runtime: cannot load model {where}: not a valid ONNX file ({why})")


def _check_location(raw: bytes, tensor: bytes, where: str) -> None:
    location = raw.decode("utf-8", errors="replace")
    path = PurePosixPath(location)
    if (
        not location
        or "\0" in location
        or "\\" in location
        or path.is_absolute()
        or (len(location) > 1 and location[1] == ":")
        or ".." in path.parts
    ):
        raise InvalidInputError(
            f"{where}: tensor {tensor.decode('utf-8', errors='replace')!r} keeps its data at {location!r}, outside "
            "the model's directory; external data must be a relative path inside it, without '..'"
        )
