"""The on-disk form of field samples captured on a device: records in append-only segment files.

A spool directory holds `seg-<12-digit sequence>.cap` files. The newest one is open for appends;
every older one is closed and never changes again, so it can be copied, uploaded and deleted.

A record is a fixed header (magic, payload length, crc32 of the payload) and then the payload.
A writer killed mid-record leaves a torn tail: a short header, a short payload or a crc that does
not match. Readers stop there (`iter_samples`, `valid_length`), and the device cuts the tail off
when it reopens the segment, so at most the record being written is lost.

The payload is little-endian binary: a format version, the sample's strings, its timestamp, its
meta and its tensors. A tensor is its name, its V2 datatype, its shape and its raw bytes; a BYTES
tensor holds length-prefixed items and a flag saying whether they were `str` or `bytes`, so a
decoded array equals the one that was encoded. Segments may travel off the device before they are
read, so decoding checks every length against what is left of the payload before it slices.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol.datatypes import from_datatype, to_datatype

MAGIC = b"ACP1"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
#: The largest payload a record may hold; a header that claims more is read as a torn tail.
MAX_RECORD_BYTES = 256 * 1024 * 1024
MAX_TENSORS = 1024
MAX_DIMS = 32
MAX_META_ITEMS = 64

SEGMENT_PATTERN = re.compile(r"seg-\d{12}\.cap")
_SEGMENT_TEMPLATE = "seg-{:012d}.cap"

_STR_ITEMS, _BYTES_ITEMS = 1, 0


@dataclass(frozen=True)
class Sample:
    """One captured inference: what the served model revision was given and (optionally) answered."""

    model: str
    revision: str
    device: str
    timestamp: float
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- segments


def segment_name(sequence: int) -> str:
    """The file name of the segment with this sequence number."""
    if not 0 < sequence < 10**12:
        raise InvalidInputError(f"segment sequence {sequence} is outside 1..999999999999")
    return _SEGMENT_TEMPLATE.format(sequence)


def segment_sequence(name: str) -> int:
    """The sequence number in a segment file name; `InvalidInputError` for any other name."""
    if not SEGMENT_PATTERN.fullmatch(name):
        raise InvalidInputError(f"{name[:100]!r} is not a capture segment name (seg-<12 digits>.cap)")
    return int(name[4:16])


def segments(spool_dir: Path | str) -> list[Path]:
    """Every segment file in the spool, oldest first (other files are ignored)."""
    directory = Path(spool_dir)
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if SEGMENT_PATTERN.fullmatch(path.name) and path.is_file()]
    return sorted(found, key=lambda path: path.name)


def closed_segments(spool_dir: Path | str) -> list[Path]:
    """The spool's closed segments, oldest first: every segment but the newest (open for appends)."""
    return segments(spool_dir)[:-1]


# ---------------------------------------------------------------- records


def encode_record(payload: bytes) -> bytes:
    """A payload framed as a record: header, then payload."""
    if len(payload) > MAX_RECORD_BYTES:
        raise InvalidInputError(f"a capture record of {len(payload)} bytes is over the {MAX_RECORD_BYTES} allowed")
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def iter_payloads(path: Path | str) -> Iterator[tuple[int, bytes]]:
    """(end offset, payload) of each whole record in a segment, stopping at the first torn or bad one."""
    with open(path, "rb") as stream:
        offset = 0
        while True:
            head = stream.read(HEADER.size)
            if len(head) < HEADER.size:
                return
            magic, length, crc = HEADER.unpack(head)
            if magic != MAGIC or length > MAX_RECORD_BYTES:
                return
            payload = stream.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return
            offset += HEADER.size + length
            yield offset, payload


def valid_length(path: Path | str) -> int:
    """How many leading bytes of a segment are whole, intact records (where a torn tail begins)."""
    end = 0
    for end, _payload in iter_payloads(path):  # noqa: B007 (the last one is the answer)
        pass
    return end


def encode_sample(sample: Sample) -> bytes:
    """A sample as one framed record, ready to append to a segment."""
    return encode_record(encode_payload(sample))


def iter_samples(path: Path | str) -> Iterator[Sample]:
    """The samples of a segment, oldest first, up to its torn tail if it has one."""
    for _end, payload in iter_payloads(path):
        yield decode_payload(payload)


# ---------------------------------------------------------------- payload


def encode_payload(sample: Sample) -> bytes:
    """A sample's payload (unframed)."""
    parts: list[bytes] = [struct.pack("<B", FORMAT_VERSION)]
    for text in (sample.model, sample.revision, sample.device):
        _put_text(parts, text)
    parts.append(struct.pack("<d", float(sample.timestamp)))
    _put_count(parts, len(sample.meta), MAX_META_ITEMS, "meta items")
    for key, value in sample.meta.items():
        _put_text(parts, str(key))
        _put_text(parts, str(value))
    for tensors in (sample.inputs, sample.outputs):
        _put_count(parts, len(tensors), MAX_TENSORS, "tensors")
        for name, array in tensors.items():
            _put_tensor(parts, name, np.asarray(array))
    return b"".join(parts)


def _put_count(parts: list[bytes], count: int, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidInputError(f"a capture sample holds {count} {what}, over the {limit} allowed")
    parts.append(struct.pack("<H", count))


def _put_text(parts: list[bytes], text: str) -> None:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise InvalidInputError(f"a capture sample string of {len(raw)} bytes is over the 65535 allowed")
    parts.append(struct.pack("<H", len(raw)))
    parts.append(raw)


def _put_tensor(parts: list[bytes], name: str, array: np.ndarray) -> None:
    datatype = to_datatype(array.dtype)
    _put_text(parts, name)
    _put_text(parts, datatype)
    if array.ndim > MAX_DIMS:
        raise InvalidInputError(f"tensor {name!r} has {array.ndim} dimensions, over the {MAX_DIMS} allowed")
    parts.append(struct.pack(f"<B{array.ndim}Q", array.ndim, *array.shape))
    if datatype == "BYTES":
        _put_items(parts, array)
        return
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    parts.append(struct.pack("<Q", len(raw)))
    parts.append(raw)


def _put_items(parts: list[bytes], array: np.ndarray) -> None:
    items = array.ravel().tolist()
    as_text = all(isinstance(item, str) for item in items) and bool(items)
    parts.append(struct.pack("<B", _STR_ITEMS if as_text else _BYTES_ITEMS))
    for item in items:
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)


class _Reader:
    """Reads a payload front to back, refusing any length that runs past its end."""

    def __init__(self, payload: bytes) -> None:
        self.view = memoryview(payload)
        self.at = 0

    def take(self, size: int) -> memoryview:
        if size < 0 or self.at + size > len(self.view):
            raise InvalidInputError(f"capture record: a field of {size} bytes runs past the end of its payload")
        piece = self.view[self.at : self.at + size]
        self.at += size
        return piece

    def unpack(self, fmt: str) -> tuple:
        layout = struct.Struct(fmt)
        return layout.unpack(self.take(layout.size))

    def text(self) -> str:
        (size,) = self.unpack("<H")
        try:
            return bytes(self.take(size)).decode()
        except UnicodeDecodeError as err:
            raise InvalidInputError("capture record: a string is not valid UTF-8") from err

    def count(self, limit: int, what: str) -> int:
        (count,) = self.unpack("<H")
        if count > limit:
            raise InvalidInputError(f"capture record: {count} {what}, over the {limit} allowed")
        return count


def decode_payload(payload: bytes) -> Sample:
    """The sample in a payload; `InvalidInputError` when the payload is malformed."""
    reader = _Reader(payload)
    (version,) = reader.unpack("<B")
    if version != FORMAT_VERSION:
        raise InvalidInputError(f"capture record: format version {version}; this reader knows {FORMAT_VERSION}")
    model, revision, device = reader.text(), reader.text(), reader.text()
    (timestamp,) = reader.unpack("<d")
    meta = {reader.text(): reader.text() for _ in range(reader.count(MAX_META_ITEMS, "meta items"))}
    inputs = _tensors(reader)
    outputs = _tensors(reader)
    if reader.at != len(payload):
        raise InvalidInputError(f"capture record: {len(payload) - reader.at} bytes after its last tensor")
    return Sample(model, revision, device, timestamp, inputs, outputs, meta)


def _tensors(reader: _Reader) -> dict[str, np.ndarray]:
    tensors = {}
    for _ in range(reader.count(MAX_TENSORS, "tensors")):
        name = reader.text()
        tensors[name] = _tensor(reader, name)
    return tensors


def _tensor(reader: _Reader, name: str) -> np.ndarray:
    datatype = reader.text()
    dtype = from_datatype(datatype)
    (ndim,) = reader.unpack("<B")
    if ndim > MAX_DIMS:
        raise InvalidInputError(f"capture record: tensor {name!r} has {ndim} dimensions")
    shape = reader.unpack(f"<{ndim}Q")
    count = 1
    for dim in shape:
        count *= dim
    if datatype == "BYTES":
        return _items(reader, name, count).reshape(shape)
    (size,) = reader.unpack("<Q")
    if size != count * dtype.itemsize:
        raise InvalidInputError(f"capture record: tensor {name!r} holds {size} bytes, not {count} x {dtype.itemsize}")
    flat = np.frombuffer(reader.take(size), dtype=dtype.newbyteorder("<")).astype(dtype, copy=True)
    return flat.reshape(shape)


def _items(reader: _Reader, name: str, count: int) -> np.ndarray:
    (kind,) = reader.unpack("<B")
    if count * 4 > len(reader.view) - reader.at:
        raise InvalidInputError(f"capture record: tensor {name!r} claims {count} items, more than its payload holds")
    items = np.empty(count, dtype=object)
    for i in range(count):
        (size,) = reader.unpack("<I")
        raw = bytes(reader.take(size))
        items[i] = _text(raw, name) if kind == _STR_ITEMS else raw
    return items


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"capture record: tensor {name!r} holds a string that is not valid UTF-8") from err
