"""A bounded look at a protobuf message's wire bytes before they are parsed.

Parsing makes an object of every field: a message of millions of two-byte fields (empty
`inputs` entries, one-byte varints in packed `int64_contents`) becomes many times its size in
memory, and is built before any code of ours sees it. `check_parse_cost` walks the wire format
along the message's descriptor, counting field occurrences and what each costs once parsed,
and refuses a message past either bound; it stops at the first field over the count, so its
work is bounded too. Packed numbers are counted in C (`bytes.translate`), not byte by byte.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from arachne_mlflow.errors import InvalidInputError

#: Field occurrences one request may hold, nested ones included (a tensor's shape, its strings...).
MAX_FIELDS = 65_536
#: What a parsed field costs beyond its payload (the parser's and Python's per-object overhead).
FIELD_COST = 64
_VARINT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
    }
)
_CONTINUATION_BYTES = bytes(range(128, 256))  # (a varint ends at each byte below 128)


class MessageTooCostlyError(InvalidInputError):
    """A request whose parsing would take more fields or memory than the server allows."""

    status_code = 413


def check_parse_cost(data: bytes | memoryview, descriptor: Descriptor, max_bytes: int) -> None:
    """Refuse `data` (a serialized `descriptor` message) if parsing it would make more than
    `MAX_FIELDS` fields or take more than `max_bytes` of memory."""
    budget = _Budget(max_bytes)
    _walk(memoryview(data), descriptor, budget)


class _Budget:
    def __init__(self, max_bytes: int):
        self.fields = 0
        self.bytes = 0
        self.max_bytes = max_bytes

    def spend(self, fields: int, nbytes: int) -> None:
        self.fields += fields
        self.bytes += nbytes
        if self.fields > MAX_FIELDS:
            raise MessageTooCostlyError(
                f"the request has more than {MAX_FIELDS} fields (tensors, shape entries, strings...): "
                "send tensor data in raw_input_contents"
            )
        if self.bytes > self.max_bytes:
            raise MessageTooCostlyError(f"the request would take more than {self.max_bytes} bytes once parsed")


def _walk(data: memoryview, descriptor: Descriptor, budget: _Budget) -> None:
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        if wire_type == 0:
            _, pos = _varint(data, pos)
            budget.spend(1, FIELD_COST)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            budget.spend(1, FIELD_COST)
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise _malformed()
            _length_delimited(data[pos : pos + length], field, budget)
            pos += length
        else:  # groups (3, 4) are not proto3; 6 and 7 do not exist
            raise _malformed()
    if pos != end:
        raise _malformed()


def _length_delimited(payload: memoryview, field: FieldDescriptor | None, budget: _Budget) -> None:
    if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
        budget.spend(1, FIELD_COST)
        _walk(payload, field.message_type, budget)
    elif field is not None and field.type in _VARINT_TYPES:  # packed varints: each is 8 bytes once parsed
        count = len(payload.tobytes().translate(None, _CONTINUATION_BYTES))
        budget.spend(1, FIELD_COST + 8 * count)
    else:  # strings, bytes, packed fixed-size numbers, unknown fields: about their size
        budget.spend(1, FIELD_COST + len(payload))


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if pos >= len(data):
            raise _malformed()
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _malformed()


def _malformed() -> InvalidInputError:
    return InvalidInputError("the request is not a well-formed protobuf message")
