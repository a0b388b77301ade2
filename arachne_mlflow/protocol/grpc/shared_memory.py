"""Tensors in shared memory regions over gRPC: `ModelInferRequest`s whose tensors name a region.

As Triton does, `raw_input_contents` holds an entry for each input that is not in a region (in
order), and the answer's `raw_output_contents` one entry for every output, empty for an output
written to a region (Triton's C++ client reads entry i for output i, whatever it holds); such an
output's entry names its datatype and shape, and carries no parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import codec
from arachne_mlflow.protocol.datatypes import from_datatype
from arachne_mlflow.protocol.grpc import codec as grpc_codec
from arachne_mlflow.protocol.grpc import inference_pb2 as pb
from arachne_mlflow.protocol.shared_memory import (
    REGION,
    RegionAccess,
    SharedMemoryRequest,
    read_tensor,
    refuse_classes_in_regions,
    region_span,
    write_tensor,
)


def names_region(request: pb.ModelInferRequest) -> bool:
    """Whether any tensor of the request names a region."""
    return any(REGION in t.parameters for t in request.inputs) or any(REGION in t.parameters for t in request.outputs)


def request_size(request: pb.ModelInferRequest) -> int:
    """The message's bytes and those its regions hold (the dataplane's measure of a request's size)."""
    spans = [region_span(plain_parameters(t.parameters), "input") for t in request.inputs]
    return request.ByteSize() + sum(span.byte_size for span in spans if span is not None)


def plain_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """`InferParameter`s as plain values (Triton's client sends the region as a string, sizes as int64)."""
    return {
        key: getattr(value, value.WhichOneof("parameter_choice") or "int64_param") for key, value in parameters.items()
    }


def decoder(regions: RegionAccess):
    """The gRPC decode function (dataplane's `Decode`) that reads inputs from `regions`."""

    def decode(request: pb.ModelInferRequest, specs: Sequence[codec.InputSpec]) -> SharedMemoryRequest:
        grpc_codec.refuse_sequence_of(request)
        wanted = {spec.name: spec for spec in specs}
        spans = [region_span(plain_parameters(t.parameters), f"input {t.name!r}") for t in request.inputs]
        raw = list(request.raw_input_contents)
        plain_count = sum(span is None for span in spans)
        if raw and len(raw) != plain_count:
            raise InvalidInputError(
                f"raw_input_contents has {len(raw)} entries for {plain_count} inputs not in shared memory: "
                "give one per such input, in order"
            )
        inputs: dict[str, np.ndarray] = {}
        for tensor, span in zip(request.inputs, spans):
            name = tensor.name
            if name in inputs:
                raise InvalidInputError(f"tensor {name!r} appears twice")
            if span is not None:
                if tensor.contents.ByteSize():
                    raise InvalidInputError(f"input {name!r}: its data is in {REGION}; give no contents besides")
                inputs[name] = read_tensor(regions, span, name, tensor.datatype, list(tensor.shape), wanted)
                continue
            codec.check_input(wanted, name, from_datatype(tensor.datatype), tuple(tensor.shape))
            if raw:
                inputs[name] = codec.tensor_from_bytes(name, tensor.datatype, list(tensor.shape), raw.pop(0))
            else:
                inputs[name] = grpc_codec.from_contents(tensor)
        outputs, output_regions = None, {}
        if request.outputs:
            outputs = tuple((output.name, True) for output in request.outputs)
            for output in request.outputs:
                span = region_span(plain_parameters(output.parameters), f"output {output.name!r}")
                if span is not None:
                    output_regions[output.name] = span
        classes = grpc_codec.output_classes(request)
        refuse_classes_in_regions(output_regions, classes)
        return SharedMemoryRequest(inputs, outputs, True, request.id or None, classes, output_regions=output_regions)

    return decode


def encoder(regions: RegionAccess):
    """The gRPC encode function (dataplane's `Encode`) that writes outputs into `regions`."""

    def encode(
        model_name: str, results: Mapping[str, np.ndarray], request: SharedMemoryRequest, model_version: str = "1"
    ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
        wanted = [name for name, _ in request.outputs] if request.outputs is not None else list(results)
        raw: list[bytes] = []
        for name in wanted:
            if name not in results:
                raise InvalidInputError(f"model {model_name!r} has no output {name!r}; outputs: {list(results)}")
            array = np.asarray(results[name])
            span = request.output_regions.get(name)
            if span is None:
                datatype, blob = codec.tensor_bytes(array)
                response.outputs.add(name=name, datatype=datatype, shape=array.shape)
                raw.append(bytes(blob))
                continue
            datatype = write_tensor(regions, span, name, array)
            response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            raw.append(b"")
        response.raw_output_contents.extend(raw)
        return response

    return encode
