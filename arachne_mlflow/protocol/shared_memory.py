"""Tensors in shared memory regions (Triton's shared memory extension), as the infer messages name them.

An input or a requested output carries `shared_memory_region`, `shared_memory_byte_size` and
optionally `shared_memory_offset` in its parameters, and no data: the input's bytes are read from
the region (in the same layout as a binary blob), the output's written to it. As Triton answers,
the output's entry then names its datatype and shape only: no data and no parameters (Triton's
C++ client takes an output entry with parameters for a binary one and needs its
`binary_data_size`). What a region is and how it is read
belongs to the server (a `RegionAccess`); this module only speaks the protocol, for REST here and
for gRPC in `protocol/grpc/shared_memory.py`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import codec
from arachne_mlflow.protocol.datatypes import from_datatype
from arachne_mlflow.protocol.sequence import refuse_sequence

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
PARAMETERS = (REGION, BYTE_SIZE, OFFSET)
_MARKER = REGION.encode()
_NATIVE_IS_WIRE = sys.byteorder == "little"
_MAX_INT = 2**63 - 1


class RegionAccess(Protocol):
    """What reading and writing tensors needs of the server's registry of regions."""

    def check_span(self, name: str, offset: int, byte_size: int) -> None: ...

    def read_into(self, name: str, offset: int, out: memoryview) -> None: ...

    def read(self, name: str, offset: int, byte_size: int) -> bytes: ...

    def write(self, name: str, offset: int, data: memoryview) -> None: ...


@dataclass(frozen=True)
class RegionSpan:
    """Where a tensor's bytes are: `byte_size` bytes at `offset` of the region named `region`."""

    region: str
    offset: int
    byte_size: int


@dataclass
class SharedMemoryRequest(codec.InferRequest):
    """An infer request with outputs to write into regions, by output name."""

    output_regions: dict[str, RegionSpan] = field(default_factory=dict)


def region_span(params: Mapping[str, Any] | None, what: str) -> RegionSpan | None:
    """The span a tensor's plain parameters name, or None; region and byte size go together."""
    if not params or not any(key in params for key in PARAMETERS):
        return None
    region, size, offset = params.get(REGION), params.get(BYTE_SIZE), params.get(OFFSET, 0)
    if type(region) is not str or not region or size is None:
        raise InvalidInputError(f"{what}: give {REGION} and {BYTE_SIZE} together")
    for key, value in ((BYTE_SIZE, size), (OFFSET, offset)):
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            raise InvalidInputError(f"{what}: {key} must be a non-negative integer")
    return RegionSpan(region, offset, size)


def refuse_classes_in_regions(regions: Mapping[str, RegionSpan], classes: Mapping[str, int]) -> None:
    """An output is written to a region or answered as its top classes, not both (as Triton refuses)."""
    for name in regions:
        if name in classes:
            raise InvalidInputError(f"output {name!r} can't set both {REGION!r} and 'classification'")


def read_tensor(
    regions: RegionAccess, span: RegionSpan, name: str, datatype: Any, shape: Any, specs: Mapping | None
) -> np.ndarray:
    """An input from its region: described and checked against the model (`specs`) first, then its
    bytes copied once, straight into the array."""
    dtype = from_datatype(datatype)
    shape, count = codec.check_shape(name, shape)
    if specs is not None:
        codec.check_input(specs, name, dtype, shape)
    if dtype.kind == "O" or not _NATIVE_IS_WIRE:
        return codec.tensor_from_bytes(
            name, datatype, list(shape), regions.read(span.region, span.offset, span.byte_size)
        )
    if span.byte_size != count * dtype.itemsize:
        raise InvalidInputError(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"{BYTE_SIZE} is {span.byte_size}"
        )
    regions.check_span(span.region, span.offset, span.byte_size)  # before the array is made
    array = np.empty(shape, dtype)
    regions.read_into(span.region, span.offset, memoryview(array.reshape(-1).view(np.uint8)))
    return array


def write_tensor(regions: RegionAccess, span: RegionSpan, name: str, array: np.ndarray) -> str:
    """An output written into its region; its datatype."""
    datatype, blob = codec.tensor_bytes(np.asarray(array))
    blob = memoryview(blob).cast("B")
    if len(blob) > span.byte_size:
        raise InvalidInputError(
            f"output {name!r} is {len(blob)} bytes, more than the {span.byte_size} bytes of its {BYTE_SIZE}"
        )
    regions.write(span.region, span.offset, blob)
    return datatype


# -- REST ------------------------------------------------------------------------------------


def names_region(body: bytes, header_length: str | bytes | None) -> bool:
    """Whether a REST infer request's JSON mentions a region (a quick look before any parsing)."""
    try:
        end = len(body) if header_length is None else int(header_length)
    except ValueError:
        return False  # (the codec refuses it)
    return body.find(_MARKER, 0, end) >= 0


class RestMessage:
    """A REST infer request that names regions: its JSON parsed once, its tensors read from regions."""

    def __init__(self, body: bytes, header_length: str | bytes | None, regions: RegionAccess):
        self.header, self.binary = codec.split_message(body, header_length)
        self.regions = regions
        entries = self.header.get("inputs")
        if type(entries) is not list:
            raise InvalidInputError("'inputs' must be a list of tensors")
        self.spans = [region_span(_params(entry), "input") if type(entry) is dict else None for entry in entries]
        #: What the request moves, body and regions (the dataplane's measure of a request's size).
        self.size = len(body) + sum(span.byte_size for span in self.spans if span is not None)

    def decode(self, _message: Any, specs: Sequence[codec.InputSpec]) -> SharedMemoryRequest:
        wanted = {spec.name: spec for spec in specs}
        entries = self.header["inputs"]
        plain = [entry for entry, span in zip(entries, self.spans) if span is None]
        inputs = codec.decode_tensors(plain, self.binary, specs)
        for entry, span in zip(entries, self.spans):
            if span is None:
                continue
            name = entry.get("name")
            if type(name) is not str or name in inputs:
                raise InvalidInputError(f"an input in shared memory needs a name of its own, got {str(name)[:100]!r}")
            if "data" in entry or "binary_data_size" in entry["parameters"]:
                raise InvalidInputError(f"input {name!r}: its data is in {REGION}; give no data besides")
            inputs[name] = read_tensor(self.regions, span, name, entry.get("datatype"), entry.get("shape"), wanted)
        params = _params(self.header)
        refuse_sequence(params)
        binary_output = bool(params.get("binary_data_output", False))
        items = self.header.get("outputs")
        outputs, classes = codec.requested_outputs(items, binary_output) if items is not None else (None, {})
        output_regions = _output_regions(items)
        refuse_classes_in_regions(output_regions, classes)
        return SharedMemoryRequest(
            inputs,
            outputs,
            binary_output,
            codec.parse_request_id(self.header.get("id")),
            classes,
            output_regions=output_regions,
        )

    def encode(
        self, model_name: str, results: Mapping[str, np.ndarray], request: SharedMemoryRequest, model_version: str
    ) -> tuple[bytes, int | None]:
        def encode_one(name: str, array: Any, binary: bool) -> tuple[dict[str, Any], bytes | memoryview | None]:
            span = request.output_regions.get(name)
            if span is None:
                return codec.encode_tensor(name, array, binary)
            datatype = write_tensor(self.regions, span, name, array)
            return {"name": name, "datatype": datatype, "shape": list(np.shape(array))}, None

        parts, header_length = codec.response_parts(model_name, results, request, model_version, encode_one)
        return b"".join(parts), header_length


def _params(entry: Mapping[str, Any]) -> dict[str, Any]:
    params = entry.get("parameters")
    if params is None:
        return {}
    if type(params) is not dict:
        raise InvalidInputError("'parameters' must be an object")
    return params


def _output_regions(items: Any) -> dict[str, RegionSpan]:
    """The regions the requested outputs name (the items already checked by `codec.requested_outputs`)."""
    regions = {}
    for item in items or ():
        span = region_span(_params(item), f"output {item['name']!r}")
        if span is not None:
            regions[item["name"]] = span
    return regions
