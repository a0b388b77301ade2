"""The one tensor codec: numpy arrays <-> Open Inference Protocol (KServe V2) JSON and Triton binary data.

A V2 message is a JSON header, optionally followed by raw tensor blobs; the HTTP header
`Inference-Header-Content-Length` says where the JSON ends. A tensor travels either as JSON
`data` or as a blob whose size is in `parameters.binary_data_size` (blobs follow the JSON in the
order of the tensors). Server and client both use these functions, so both ends agree byte for
byte. Every size is checked against the shape before an array is made, so a hostile shape
cannot make the receiver allocate memory the data does not back.

A client sends the same JSON header on every call of a model (names, types, shapes; the data
travels in the blobs), and a model answers with the same one. So binary messages are parsed and
checked once: the layout they describe is kept by the header's bytes (a small bounded cache),
and a repeat costs one look-up and one array view per tensor. Encoding keeps the JSON it wrote
the same way, by the tensors' names, types and shapes.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import classification, json_data
from arachne_mlflow.protocol.datatypes import BFLOAT16, DATATYPES, from_datatype, to_datatype
from arachne_mlflow.protocol.json_data import loads as _loads
from arachne_mlflow.protocol.sequence import refuse_sequence

HEADER_LENGTH = "Inference-Header-Content-Length"

#: The most elements one tensor may declare (2**31: 8 GiB of float32); larger shapes are refused.
MAX_ELEMENTS = 2**31
_ALIGN = 8

# The wire is little-endian; on a little-endian machine these equal the native dtypes.
_WIRE = {dtype: dtype.newbyteorder("<") for dtype in DATATYPES.values()}
_NATIVE_IS_WIRE = sys.byteorder == "little"
# Layouts of binary messages and the JSON headers written, by what determines them (see above).
_CACHE_ENTRIES = 256
_CACHED_HEADER_BYTES = 4096
_request_layouts: dict[bytes, tuple] = {}
_response_layouts: dict[bytes, tuple] = {}
_request_heads: dict[tuple, bytes] = {}
_response_heads: dict[tuple, tuple] = {}


class InputSpec(Protocol):
    """What the codec needs of a model's input (`arachne_mlflow.model.spec.TensorSpec` has it)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    def accepts_shape(self, shape: Sequence[int]) -> bool: ...


# -- messages --------------------------------------------------------------------------


def _dumps(header: Mapping[str, Any]) -> bytes:
    """orjson, unless it wrote `null` (our headers hold none, so a NaN or Infinity became one):
    then the stdlib, which keeps them as NaN/Infinity literals the way tritonclient does.

    Tensor data may be a flat numpy array (`encode_tensor`): orjson writes it from the array's
    memory, without a Python object per element."""
    data = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"null" in data:
        data = json.dumps(header, separators=(",", ":"), default=_as_list).encode()
    return data


def _as_list(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def split_message(body: bytes, header_length: str | bytes | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary part of a V2 message (a view: nothing is copied)."""
    size = _json_size(body, header_length)
    view = memoryview(body)
    return _object(_loads(view[:size])), view[size:]


def _split_request(
    body: bytes, header_length: str | bytes | None, specs: Sequence[InputSpec] | None
) -> tuple[dict[str, Any], memoryview, json_data.LiftedArrays | None]:
    """`split_message`, but the numbers of a large JSON part are left as text (`json_data`) until
    their tensors are checked; with `specs`, other JSON beyond a small size is refused unless the
    model takes BYTES (its strings are the one thing that must be parsed as Python objects)."""
    size = _json_size(body, header_length)
    view = memoryview(body)
    if size <= json_data.SMALL_MESSAGE:
        return _object(_loads(view[:size])), view[size:], None
    lifted = json_data.lift(body, size)
    rest = lifted.rest_size
    if rest > json_data.SMALL_MESSAGE and specs is not None and all(s.dtype.kind != "O" for s in specs):
        raise InvalidInputError(
            f"the request holds {rest} bytes of JSON besides lists of numbers, and the model takes no "
            "BYTES input: send tensors as lists of numbers or as binary data"
        )
    return _object(_loads(lifted.header())), view[size:], lifted


def _json_size(body: bytes, header_length: str | bytes | None) -> int:
    if header_length is None:
        return len(body)
    try:
        size = int(header_length)
    except ValueError as err:
        raise InvalidInputError(f"{HEADER_LENGTH} {header_length!r} is not a number") from err
    if not 0 <= size <= len(body):
        raise InvalidInputError(f"{HEADER_LENGTH} {size} is outside the body of {len(body)} bytes")
    return size


def _object(header: Any) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise InvalidInputError("request body must be a JSON object")
    return header


def _message_parts(header: Mapping[str, Any], blobs: Sequence[bytes | memoryview]) -> tuple[list, int | None]:
    """The pieces of a V2 message (JSON header, then blobs) and the header length to send (None
    when there are no blobs)."""
    head = _dumps(header)
    if not blobs:
        return [head], None
    head += b" " * (-len(head) % _ALIGN)  # JSON allows trailing spaces; aligned blobs decode without a copy
    return [head, *blobs], len(head)


def encode_request(
    inputs: Mapping[str, Any], binary: bool = True, outputs: Sequence[str] | None = None, request_id: str | None = None
) -> tuple[bytes, int | None]:
    """An infer request body: inputs by name, outputs asked for in binary when `binary`."""
    parts, header_length = request_parts(inputs, binary, outputs, request_id)
    return b"".join(parts), header_length


def request_parts(
    inputs: Mapping[str, Any], binary: bool = True, outputs: Sequence[str] | None = None, request_id: str | None = None
) -> tuple[list[bytes | memoryview], int | None]:
    """`encode_request` as the pieces of the body, to be sent gathered: tensors are not copied."""
    key = None
    if binary and outputs is None and request_id is None:
        key = tuple([(name, value.dtype, value.shape) for name, value in inputs.items() if type(value) is np.ndarray])
        head = _request_heads.get(key) if len(key) == len(inputs) else None
        if head is not None:  # native numeric arrays (see _numeric_blobs): their memory is the blob
            try:
                return [head, *[memoryview(value).cast("B") for value in inputs.values()]], len(head)
            except TypeError:  # an array that is not one C-contiguous block
                return [head, *[_to_bytes(value, "") for value in inputs.values()]], len(head)
    header: dict[str, Any] = {"inputs": [], "parameters": {"binary_data_output": binary}}
    if request_id is not None:
        header["id"] = request_id
    blobs = []
    for name, array in inputs.items():
        entry, blob = encode_tensor(name, array, binary)
        header["inputs"].append(entry)
        if blob is not None:
            blobs.append(blob)
    if outputs is not None:
        header["outputs"] = [{"name": name, "parameters": {"binary_data": binary}} for name in outputs]
    parts, header_length = _message_parts(header, blobs)
    if key is not None and _numeric_blobs(key, inputs):
        _remember(_request_heads, key, parts[0])
    return parts, header_length


@dataclass
class InferRequest:
    """A decoded infer request: arrays by name and how each requested output is to be sent."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[tuple[str, bool], ...] | None  # (name, binary); None = every output
    binary_output: bool
    id: str | None = None  # echoed in the answer (a number sent as the id comes back as a string)
    #: Outputs asked for as their top classes (protocol/classification.py): name -> class count.
    classes: Mapping[str, int] = field(default_factory=dict)


def decode_request(
    body: bytes, header_length: str | bytes | None, inputs: Sequence[InputSpec] | None = None
) -> InferRequest:
    """An infer request from its body and `Inference-Header-Content-Length` (None: all JSON).

    With `inputs` (the model's), each tensor's name, datatype and shape are checked against them
    before its data is decoded: a request the model cannot take costs little more than its bytes.
    """
    cached = _cached_layout(_request_layouts, body, header_length)
    if cached is not None:  # (views on the body, checked by the model before it runs)
        (layout, outputs, binary_output, request_id, classes), size = cached
        return InferRequest(_arrays(layout, body, size), outputs, binary_output, request_id, classes)
    header, binary, lifted = _split_request(body, header_length, inputs)
    params = header.get("parameters")
    if params is None:
        binary_output = False
    elif type(params) is dict:
        refuse_sequence(params)
        binary_output = bool(params.get("binary_data_output", False))
    else:
        raise InvalidInputError("'parameters' must be an object")
    outputs, classes = header.get("outputs"), {}
    if outputs is not None:
        outputs, classes = requested_outputs(outputs, binary_output)
    request_id = parse_request_id(header.get("id"))
    arrays = decode_tensors(header.get("inputs"), binary, inputs, lifted)
    layout = _binary_layout(header["inputs"], arrays)
    if layout is not None:
        _remember_layout(_request_layouts, body, header_length, (layout, outputs, binary_output, request_id, classes))
    return InferRequest(arrays, outputs, binary_output, request_id, classes)


def parse_request_id(value: Any) -> str | None:
    """The request's `id`, a string as the protocol's schema says; a number sent by a lenient client
    becomes its JSON text, so the answer never carries an id of another type than a string."""
    if value is None or type(value) is str:
        return value
    if type(value) is float or (type(value) is int and -(2**63) <= value < 2**64):
        return json.dumps(value)
    raise InvalidInputError(f"'id' must be a string, got {str(value)[:100]!r}")


def requested_outputs(items: Any, binary_output: bool) -> tuple[tuple[tuple[str, bool], ...], dict[str, int]]:
    """The requested outputs as (name, binary), and the class counts of those asked as classes."""
    if not isinstance(items, list):
        raise InvalidInputError("'outputs' must be a list")
    outputs, classes = [], {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInputError(f"a requested output must be an object with a 'name', got {str(item)[:100]!r}")
        item_params = item.get("parameters") or {}
        if not isinstance(item_params, dict):
            raise InvalidInputError(f"output {item['name']!r}: 'parameters' must be an object")
        outputs.append((item["name"], bool(item_params.get("binary_data", binary_output))))
        if classification.PARAMETER in item_params:
            classes[item["name"]] = classification.class_count(item_params[classification.PARAMETER], item["name"])
    return tuple(outputs), classes


def encode_response(
    model_name: str, results: Mapping[str, np.ndarray], request: InferRequest, model_version: str = "1"
) -> tuple[bytes, int | None]:
    """The infer response for `request`: the outputs it asked for, binary where it asked so."""
    key = None
    if request.outputs is None and request.binary_output:  # every output, binary: the usual request
        key = (
            model_name,
            model_version,
            request.id,
            *[(name, array.dtype, array.shape) for name, array in results.items() if type(array) is np.ndarray],
        )
        cached = _response_heads.get(key) if len(key) == 3 + len(results) else None
        if cached is not None:
            try:  # native numeric arrays (see _numeric_blobs): their bytes are the wire's, joined as they are
                return b"".join([cached, *results.values()]), len(cached)
            except TypeError:  # an output that is not one C-contiguous block
                return b"".join([cached, *[_to_bytes(array, "") for array in results.values()]]), len(cached)
    parts, header_length = response_parts(model_name, results, request, model_version)
    if key is not None and _numeric_blobs(key[3:], results):
        _remember(_response_heads, key, parts[0])
    return b"".join(parts), header_length


def response_parts(
    model_name: str,
    results: Mapping[str, np.ndarray],
    request: InferRequest,
    model_version: str,
    encode_one: Callable[[str, Any, bool], tuple[dict[str, Any], bytes | memoryview | None]] | None = None,
) -> tuple[list, int | None]:
    """The pieces of the answer to `request` and its header length; `encode_one` makes each output's entry
    and blob (shared memory writes some into regions instead: protocol/shared_memory.py)."""
    encode_one = encode_one or encode_tensor
    wanted = request.outputs if request.outputs is not None else [(n, request.binary_output) for n in results]
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": []}
    if request.id is not None:
        header["id"] = request.id
    blobs = []
    for name, binary in wanted:
        if name not in results:
            raise InvalidInputError(f"model {model_name!r} has no output {name!r}; outputs: {list(results)}")
        entry, blob = encode_one(name, results[name], binary)
        header["outputs"].append(entry)
        if blob is not None:
            blobs.append(blob)
    return _message_parts(header, blobs)


def decode_response(body: bytes, header_length: str | bytes | None) -> dict[str, np.ndarray]:
    """The outputs of an infer response, by name."""
    cached = _cached_layout(_response_layouts, body, header_length)
    if cached is not None:
        layout, size = cached
        return _arrays(layout, body, size)
    header, binary = split_message(body, header_length)
    outputs = decode_tensors(header.get("outputs"), binary)
    layout = _binary_layout(header["outputs"], outputs)
    if layout is not None:
        _remember_layout(_response_layouts, body, header_length, layout)
    return outputs


# -- the caches of repeated headers ----------------------------------------------------


def _remember(cache: dict, key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()  # bounded: a client that varies its headers only refills it
    cache[key] = value


def _numeric_blobs(key: tuple, tensors: Mapping[str, Any]) -> bool:
    """Whether `key` describes every tensor, each a numeric array of the wire's byte order sent as a
    blob (a header worth keeping)."""
    return (
        _NATIVE_IS_WIRE
        and len(key) == len(tensors) > 0
        and all(dtype.kind in "biuf" and dtype.isnative for _, dtype, _ in key)
    )


def _cached_layout(cache: dict[bytes, tuple], body: Any, header_length: str | bytes | None) -> tuple | None:
    """(what was kept for this message's JSON header, header size), or None."""
    if header_length is None or type(body) is not bytes:
        return None
    try:
        size = int(header_length)
    except ValueError:
        return None
    if not 0 < size <= _CACHED_HEADER_BYTES:
        return None
    value = cache.get(body[:size])
    return None if value is None else (value, size)


def _remember_layout(cache: dict[bytes, tuple], body: Any, header_length: str | bytes | None, value: Any) -> None:
    size = int(header_length)  # type: ignore[arg-type]  (a layout exists only for a framed message)
    if type(body) is bytes and size <= _CACHED_HEADER_BYTES:
        _remember(cache, body[:size], value)


def _binary_layout(entries: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> tuple | None:
    """((name, dtype, shape, offset), ...) and the blob size, when every tensor is a numeric blob."""
    if not _NATIVE_IS_WIRE or not entries:
        return None
    layout, offset = [], 0
    for entry in entries:
        size = (entry.get("parameters") or {}).get("binary_data_size")
        array = arrays[entry["name"]]
        if size is None or array.dtype.kind == "O":
            return None
        layout.append((entry["name"], array.dtype, array.shape, offset))
        offset += size
    return tuple(layout), offset


def _arrays(layout: tuple, body: bytes, header_size: int) -> dict[str, np.ndarray]:
    """The arrays of a message whose header matched a kept layout: views on `body`."""
    tensors, blob_size = layout
    if len(body) - header_size != blob_size:
        raise InvalidInputError(
            f"the tensors need {blob_size} bytes of binary data, the message has {len(body) - header_size}"
        )
    arrays = {}
    for name, dtype, shape, offset in tensors:
        array = np.ndarray(shape, dtype, body, header_size + offset)
        arrays[name] = array if array.flags.aligned else array.copy()
    return arrays


# -- tensors ---------------------------------------------------------------------------


def encode_tensor(name: str, array: Any, binary: bool) -> tuple[dict[str, Any], bytes | memoryview | None]:
    """One tensor as its V2 JSON entry and, when `binary`, the blob that follows the JSON."""
    array = np.asarray(array)
    datatype = to_datatype(array.dtype)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        blob = _to_bytes(array, datatype)
        entry["parameters"] = {"binary_data_size": len(blob)}
        return entry, blob
    if datatype == "BYTES":
        entry["data"] = _texts(name, array)
    else:
        flat = array.ravel()
        # orjson writes native numbers and booleans from the array's memory (_dumps); bfloat16 (kind V) as a list
        entry["data"] = flat if flat.dtype.isnative and flat.dtype.kind in "biuf" else flat.tolist()
    return entry, None


def decode_tensors(
    entries: Any,
    binary: memoryview,
    specs: Sequence[InputSpec] | None = None,
    lifted: json_data.LiftedArrays | None = None,
) -> dict[str, np.ndarray]:
    """Arrays from a list of V2 tensor entries and the binary part of the message, by name.

    Binary tensors are views on `binary` when aligned (zero copy); the binary part
    must be used up exactly. With `specs`, a tensor that none of them takes is refused before its
    data is decoded; `lifted` holds the JSON data arrays `_split_request` left as text.
    """
    if type(entries) is not list:
        raise InvalidInputError("'inputs'/'outputs' must be a list of tensors")
    wanted = None if specs is None else {spec.name: spec for spec in specs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    left = len(binary)
    for entry in entries:
        name, dtype, shape, count = _describe(entry)
        if name in arrays:
            raise InvalidInputError(f"tensor {name!r} appears twice")
        if wanted is not None:
            check_input(wanted, name, dtype, shape)
        params = entry.get("parameters")
        size = None
        if params is not None:
            if type(params) is not dict:
                raise InvalidInputError(f"tensor {name!r}: 'parameters' must be an object")
            size = params.get("binary_data_size")
        if size is None:
            data = entry.get("data")
            if lifted is not None and not isinstance(data, list):
                arrays[name] = lifted.parse(data, name, dtype, shape)
            else:
                arrays[name] = _from_json(name, data, dtype, shape, count)
            continue
        if type(size) is not int or size < 0:
            raise InvalidInputError(f"tensor {name!r}: binary_data_size must be a non-negative integer")
        if size > left:
            raise InvalidInputError(f"tensor {name!r}: binary_data_size {size} runs past the {left} bytes left")
        arrays[name] = _from_bytes(name, binary[offset : offset + size], dtype, shape, count)
        offset += size
        left -= size
    if left:
        raise InvalidInputError(f"{left} bytes of binary data are not claimed by any tensor")
    return arrays


def check_input(specs: Mapping[str, InputSpec], name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Refuse a tensor the model does not take, by its description alone (in the runtime's words)."""
    spec = specs.get(name)
    if spec is None:
        raise InvalidInputError(f"the model has no input {name!r}; its inputs are {list(specs)}")
    if dtype != spec.dtype:
        raise InvalidInputError(
            f"input {name!r}: expected dtype {spec.dtype.name} ({to_datatype(spec.dtype)}), got {to_datatype(dtype)}"
        )
    if not spec.accepts_shape(shape):
        raise InvalidInputError(f"input {name!r}: expected shape {list(spec.shape)} (-1 = any), got {list(shape)}")


def _describe(entry: Any) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """Name, dtype, shape and element count of a tensor entry, checked (the JSON types are exact:
    `type(d) is int` also refuses booleans)."""
    if type(entry) is not dict or type(entry.get("name")) is not str:
        raise InvalidInputError(f"a tensor must be an object with a 'name', got {str(entry)[:100]!r}")
    name = entry["name"]
    dtype = from_datatype(entry.get("datatype"))
    shape, count = check_shape(name, entry.get("shape"))
    return name, dtype, shape, count


def check_shape(name: str, shape: Any) -> tuple[tuple[int, ...], int]:
    """A tensor's shape as a tuple and its element count, refused unless it is a short list (or tuple)
    of non-negative integers with at most MAX_ELEMENTS elements."""
    count = 1
    if type(shape) is list or type(shape) is tuple:
        for d in shape:
            if type(d) is not int or d < 0:
                break
            count *= d
        else:
            if len(shape) > 32:
                raise InvalidInputError(f"tensor {name!r}: {len(shape)} dimensions is more than 32")
            if count > MAX_ELEMENTS:
                raise InvalidInputError(
                    f"tensor {name!r}: shape {list(shape)} has {count} elements, more than {MAX_ELEMENTS}"
                )
            return tuple(shape), count
    raise InvalidInputError(f"tensor {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")


def tensor_from_bytes(name: str, datatype: Any, shape: Any, blob: bytes | memoryview) -> np.ndarray:
    """One tensor from its raw bytes (a binary blob, or gRPC's raw contents), shape and size checked."""
    dtype = from_datatype(datatype)
    shape, count = check_shape(name, shape)
    return _from_bytes(name, memoryview(blob), dtype, shape, count)


def tensor_bytes(array: np.ndarray) -> tuple[str, bytes | memoryview]:
    """A tensor's V2 datatype and its raw bytes (BYTES elements length-prefixed)."""
    datatype = to_datatype(array.dtype)
    return datatype, _to_bytes(array, datatype)


def _from_bytes(name: str, blob: memoryview, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
    if dtype.kind == "O":
        return _bytes_elements(name, blob, count).reshape(shape)
    if len(blob) != count * dtype.itemsize:
        raise InvalidInputError(
            f"tensor {name!r}: shape {list(shape)} of {to_datatype(dtype)} needs {count * dtype.itemsize} bytes, "
            f"binary_data_size is {len(blob)}"
        )
    if _NATIVE_IS_WIRE:
        array = np.ndarray(shape, dtype, blob)
    else:
        array = np.ndarray(shape, _WIRE[dtype], blob).astype(dtype)
    return array if array.flags.aligned else array.copy()


def _from_json(name: str, data: Any, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidInputError(f"tensor {name!r}: needs 'data' (a list) or parameters.binary_data_size")
    types = set(map(type, data))  # (a JSON parser makes exact types: a set of them checks every element at C speed)
    flat = data
    if list in types:
        try:
            flat = list(_flatten(data))
        except RecursionError as err:
            raise InvalidInputError(f"tensor {name!r}: 'data' is nested too deeply") from err
        types = set(map(type, flat))
    if len(flat) != count:
        raise InvalidInputError(f"tensor {name!r}: shape {list(shape)} needs {count} elements, 'data' has {len(flat)}")
    if dtype.kind == "O":
        if not types <= {str}:
            raise InvalidInputError(f"tensor {name!r}: BYTES data must be strings")
        array = np.empty(count, dtype=object)
        try:
            array[:] = [x.encode() for x in flat]
        except UnicodeEncodeError as err:
            raise InvalidInputError(f"tensor {name!r}: BYTES data holds a string that is not valid Unicode") from err
        return array.reshape(shape)
    if not types <= _JSON_TYPES.get("f" if dtype == BFLOAT16 else dtype.kind, {int}):
        raise InvalidInputError(f"tensor {name!r}: 'data' holds values that are not {to_datatype(dtype)}")
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError, TypeError) as err:
        raise InvalidInputError(f"tensor {name!r}: 'data' does not fit {to_datatype(dtype)}: {err}") from err


#: The JSON values each kind of tensor takes: numbers for numeric tensors, booleans for BOOL, no
#: strings or objects cast silently (and `true` is no number: bool is a type of its own here).
_JSON_TYPES = {"b": {bool}, "f": {int, float}}


def _flatten(data: Iterable[Any]) -> Iterable[Any]:
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def _to_bytes(array: np.ndarray, datatype: str) -> bytes | memoryview:
    if datatype == "BYTES":
        parts = []
        for item in array.ravel().tolist():
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts += [struct.pack("<I", len(raw)), raw]
        return b"".join(parts)
    if array.dtype == BFLOAT16:  # numpy's buffer protocol refuses extension dtypes: send the bits
        array = array.view(np.uint16)
    if _NATIVE_IS_WIRE and array.dtype.isnative and array.flags.c_contiguous:
        return memoryview(array).cast("B")  # no copy
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return memoryview(little).cast("B")


def _bytes_elements(name: str, blob: memoryview, count: int) -> np.ndarray:
    """BYTES blobs: each element is a 4-byte little-endian length, then that many bytes."""
    if count * 4 > len(blob):
        raise InvalidInputError(f"tensor {name!r}: {len(blob)} bytes cannot hold {count} BYTES elements")
    items = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(blob):
            raise InvalidInputError(f"tensor {name!r}: BYTES data ends after {i} of {count} elements")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise InvalidInputError(f"tensor {name!r}: BYTES element {i} runs past the end of its data")
        items[i] = bytes(blob[offset : offset + size])
        offset += size
    if offset != len(blob):
        raise InvalidInputError(f"tensor {name!r}: {len(blob) - offset} bytes after its {count} BYTES elements")
    return items


def _texts(name: str, array: np.ndarray) -> list[str]:
    """BYTES elements as JSON strings: JSON carries text, so bytes must be UTF-8 (binary carries any)."""
    texts = []
    for i, item in enumerate(array.ravel().tolist()):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidInputError(
                    f"tensor {name!r}: BYTES element {i} is not UTF-8 text, which JSON cannot carry: "
                    "send or ask for this tensor as binary data (binary_data)"
                ) from err
        texts.append(item if isinstance(item, str) else str(item))
    return texts
