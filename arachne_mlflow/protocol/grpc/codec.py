"""numpy arrays <-> the gRPC infer messages (`ModelInferRequest` / `ModelInferResponse`).

Tensors travel in `raw_input_contents` / `raw_output_contents`, one entry per tensor in order,
in the same bytes as the REST binary extension (so the REST codec's checks decode them). Typed
`contents` (what KServe's client sends for list data) are read too; answers are always raw, the
only form tritonclient reads for every datatype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import classification, codec
from arachne_mlflow.protocol.datatypes import from_datatype
from arachne_mlflow.protocol.grpc import inference_pb2 as pb
from arachne_mlflow.protocol.sequence import PARAMETERS as SEQUENCE_PARAMETERS
from arachne_mlflow.protocol.sequence import refuse_sequence

# The typed `contents` field of each datatype; FP16 and BF16 have none (raw contents only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# Parameters of features this server does not have: refused rather than silently ignored.
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def decode_request(
    request: pb.ModelInferRequest, inputs: Sequence[codec.InputSpec] | None = None
) -> codec.InferRequest:
    """The arrays of a `ModelInferRequest` by name, and the outputs it asks for; with `inputs` (the
    model's), each tensor is checked against them before its data is decoded."""
    refuse_sequence_of(request)
    wanted = None if inputs is None else {spec.name: spec for spec in inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: give one per input, "
            "in the order of the inputs"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in inputs:
            raise InvalidInputError(f"tensor {name!r} appears twice")
        _refuse_unsupported(tensor.parameters, f"input {name!r}")
        if wanted is not None:
            codec.check_input(wanted, name, from_datatype(tensor.datatype), tuple(tensor.shape))
        if raw:
            if tensor.contents.ByteSize():
                raise InvalidInputError(f"input {name!r}: give its data in contents or raw_input_contents, not both")
            inputs[name] = codec.tensor_from_bytes(name, tensor.datatype, list(tensor.shape), raw[i])
        else:
            inputs[name] = from_contents(tensor)
    outputs = None
    if request.outputs:
        for output in request.outputs:
            _refuse_unsupported(output.parameters, f"output {output.name!r}")
        outputs = tuple((output.name, True) for output in request.outputs)
    return codec.InferRequest(inputs, outputs, True, request.id or None, output_classes(request))


def refuse_sequence_of(request: pb.ModelInferRequest) -> None:
    """A 400 for a request that names a sequence (protocol/sequence.py)."""
    refuse_sequence({key: _value(request.parameters[key]) for key in SEQUENCE_PARAMETERS if key in request.parameters})


def output_classes(request: pb.ModelInferRequest) -> dict[str, int]:
    """The class counts of the outputs asked for as their top classes (Triton's classification)."""
    classes = {}
    for output in request.outputs:
        if classification.PARAMETER in output.parameters:
            count = _value(output.parameters[classification.PARAMETER])
            classes[output.name] = classification.class_count(count, output.name)
    return classes


def encode_response(
    model_name: str, results: Mapping[str, np.ndarray], request: codec.InferRequest, model_version: str = "1"
) -> pb.ModelInferResponse:
    """The `ModelInferResponse` for `request`: the outputs it asked for (all by default), raw."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    wanted = [name for name, _ in request.outputs] if request.outputs is not None else list(results)
    raw = []
    for name in wanted:
        if name not in results:
            raise InvalidInputError(f"model {model_name!r} has no output {name!r}; outputs: {list(results)}")
        array = np.asarray(results[name])
        datatype, blob = codec.tensor_bytes(array)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        raw.append(bytes(blob))
    response.raw_output_contents.extend(raw)
    return response


def from_contents(tensor: Any) -> np.ndarray:
    """An input's typed `contents` as an array (KServe's client sends list data so)."""
    name, datatype = tensor.name, tensor.datatype
    dtype = from_datatype(datatype)
    shape, count = codec.check_shape(name, list(tensor.shape))
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInputError(f"input {name!r}: {datatype} data travels in raw_input_contents only")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"input {name!r}: shape {list(shape)} needs {count} elements, {field} has {len(values)}"
        )
    if dtype.kind == "O":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.fromiter(values, dtype=dtype, count=count).reshape(shape)  # (no list of Python numbers)
    except (OverflowError, ValueError) as err:
        raise InvalidInputError(f"input {name!r}: {field} holds values that do not fit {datatype}: {err}") from err


def _refuse_unsupported(parameters: Any, what: str) -> None:
    for key in parameters:
        if key in _SHARED_MEMORY:
            raise InvalidInputError(f"{what}: shared memory is not supported; send the tensor in the request")


def _value(parameter: pb.InferParameter) -> Any:
    """An `InferParameter`'s value, whichever field holds it (None when none is set)."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)
