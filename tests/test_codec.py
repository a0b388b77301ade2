"""The V2 tensor codec on its own: every datatype both ways, and refusal of inconsistent messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import codec, datatypes

NUMERIC = [
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
]


def _round_trip(arrays, binary):
    body, header_length = codec.encode_request(arrays, binary=binary)
    request = codec.decode_request(body, None if header_length is None else str(header_length))
    return request


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_round_trips(dtype, binary):
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    got = _round_trip({"t": array}, binary).inputs["t"]
    assert got.dtype == array.dtype
    np.testing.assert_equal(got, array)
    assert datatypes.from_datatype(datatypes.to_datatype(dtype)) == np.dtype(dtype)


def test_binary_inputs_are_views_on_the_body():
    array = np.arange(16, dtype=np.float32)
    body, header_length = codec.encode_request({"a": array, "b": array[::-1]})
    request = codec.decode_request(body, str(header_length))
    assert not request.inputs["a"].flags.owndata and not request.inputs["a"].flags.writeable
    np.testing.assert_equal(request.inputs["b"], array[::-1])


def test_a_repeated_header_is_decoded_from_its_kept_layout_with_the_same_checks():
    first, second = np.arange(6, dtype=np.int32).reshape(2, 3), np.full((2, 3), 7, np.int32)
    body, header_length = codec.encode_request({"a": first, "b": np.ones(1, np.float64)})
    again, length_again = codec.encode_request({"a": second, "b": np.zeros(1, np.float64)})
    assert again[:length_again] == body[:header_length]  # the same JSON header: the kept one
    for _ in range(2):  # a miss that keeps the layout, then hits
        request = codec.decode_request(again, str(length_again))
        np.testing.assert_equal(request.inputs["a"], second)
        assert not request.inputs["a"].flags.writeable and request.binary_output
    with pytest.raises(InvalidInputError, match="need 32 bytes"):  # the kept layout still checks the blob size
        codec.decode_request(again + b"\0" * 8, str(length_again))
    with pytest.raises(InvalidInputError, match="need 32 bytes"):
        codec.decode_request(again[:-4], str(length_again))
    response, response_length = codec.encode_response("m", {"y": second}, request)
    for _ in range(2):
        np.testing.assert_equal(codec.decode_response(response, response_length)["y"], second)
    with pytest.raises(InvalidInputError, match="need 24 bytes"):
        codec.decode_response(response[:-1], response_length)


def test_kept_headers_encode_the_same_bytes_as_a_fresh_encoding():
    request = codec.InferRequest({}, None, True, id="r1")
    # a new shape is a new header, not a stale one; the second (2, 4) joins a non-contiguous output
    for shape in [(1, 4), (2, 4), (1, 4), (2, 4)]:
        array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        body, length = codec.encode_request({"x": array})
        header = json.loads(body[:length])
        assert header["inputs"][0]["shape"] == list(shape) and body[length:] == array.tobytes()
        fortran, fortran_length = codec.encode_request({"x": np.asfortranarray(array)})  # same key, not C-ordered
        assert fortran[:fortran_length] == body[:length] and fortran[fortran_length:] == array.tobytes()
        response, response_length = codec.encode_response("m", {"y": array, "z": array[:, :1]}, request, "3")
        header = json.loads(response[:response_length])
        assert header["id"] == "r1" and header["model_version"] == "3"
        assert [o["shape"] for o in header["outputs"]] == [list(shape), [shape[0], 1]]
        assert response[response_length:] == array.tobytes() + np.ascontiguousarray(array[:, :1]).tobytes()
        for _ in range(2):  # big-endian outputs: never kept, always sent little-endian
            response, response_length = codec.encode_response("m", {"y": array.astype(">f4")}, request, "3")
            assert response[response_length:] == array.astype("<f4").tobytes()


def test_the_header_caches_stay_bounded():
    for i in range(codec._CACHE_ENTRIES + 10):
        body, length = codec.encode_request({f"t{i}": np.ones(1, np.uint8)})
        codec.decode_request(body, str(length))
    assert 0 < len(codec._request_heads) <= codec._CACHE_ENTRIES
    assert 0 < len(codec._request_layouts) <= codec._CACHE_ENTRIES


def test_bytes_tensors_round_trip():
    array = np.array([b"alpha", b"", "ü".encode()], dtype=object)
    for binary in (True, False):
        got = _round_trip({"s": array}, binary).inputs["s"]
        assert got.tolist() == array.tolist()


def test_response_follows_the_requested_outputs():
    request = codec.InferRequest(inputs={}, outputs=[("b", False), ("a", True)], binary_output=True, id="7")
    body, header_length = codec.encode_response("m", {"a": np.ones(2, np.float32), "b": np.zeros(3, np.int64)}, request)
    header = json.loads(body[:header_length])
    assert [o["name"] for o in header["outputs"]] == ["b", "a"] and header["id"] == "7"
    assert header["outputs"][0]["data"] == [0, 0, 0] and header["outputs"][1]["parameters"]["binary_data_size"] == 8
    outputs = codec.decode_response(body, str(header_length))
    np.testing.assert_equal(outputs["a"], np.ones(2, np.float32))
    with pytest.raises(InvalidInputError, match="no output 'c'"):
        codec.encode_response("m", {"a": np.ones(1)}, codec.InferRequest({}, [("c", True)], True))


def _entry(**kw):
    return {"name": "x", "datatype": "FP32", "shape": [2], **kw}


@pytest.mark.parametrize(
    "header, blob, match",
    [
        ({"inputs": [_entry(data=[1.0])]}, b"", "needs 2 elements"),
        ({"inputs": [_entry(data=[1.0, "2"])]}, b"", "not FP32"),
        ({"inputs": [_entry(data=[True, False])]}, b"", "not FP32"),
        ({"inputs": [_entry(shape=[1, 2], data=[[1.0, None]])]}, b"", "not FP32"),  # nested, then checked
        ({"inputs": [_entry(shape=[2, 1], data=[[1.0], [False]])]}, b"", "not FP32"),
        ({"inputs": [_entry(datatype="INT32", data=[1, 2.5])]}, b"", "not INT32"),
        ({"inputs": [_entry(datatype="UINT8", data=[1, True])]}, b"", "not UINT8"),
        ({"inputs": [_entry(datatype="BOOL", data=[True, 1])]}, b"", "not BOOL"),
        ({"inputs": [_entry(datatype="BYTES", data=["a", 1])]}, b"", "must be strings"),
        ({"inputs": [_entry(shape=[2, -1], data=[])]}, b"", "non-negative"),
        ({"inputs": [_entry(shape=[1 << 30, 1 << 30], parameters={"binary_data_size": 8})]}, b"\0" * 8, "more than"),
        ({"inputs": [_entry(parameters={"binary_data_size": 4})]}, b"\0" * 4, "needs 8 bytes"),
        ({"inputs": [_entry(parameters={"binary_data_size": 16})]}, b"\0" * 8, "runs past"),
        ({"inputs": [_entry(parameters={"binary_data_size": 8})]}, b"\0" * 12, "not claimed"),
        ({"inputs": [_entry(data=[1, 2]), _entry(data=[1, 2])]}, b"", "appears twice"),
        ({"inputs": [_entry(datatype="FP8", data=[1, 2])]}, b"", "unknown datatype"),
        ({"inputs": [_entry(datatype="INT8", data=[1, 300])]}, b"", "does not fit"),
        (
            {"inputs": [_entry(datatype="BYTES", shape=[1 << 28], parameters={"binary_data_size": 4})]},
            b"\0" * 4,
            "cannot hold",
        ),
        ({"inputs": {"x": 1}}, b"", "must be a list"),
        ({"inputs": [_entry(data=[1, 2])], "outputs": [{"name": "y", "parameters": [1]}]}, b"", "must be an object"),
        ({"inputs": [_entry()]}, b"", "needs 'data'"),
    ],
)
def test_inconsistent_messages_are_refused(header, blob, match):
    head = json.dumps(header).encode()
    with pytest.raises(InvalidInputError, match=match):
        codec.decode_request(head + blob, str(len(head)))


@pytest.mark.parametrize(
    "body, length, match",
    [
        (b"{", None, "not valid JSON"),
        (b"[1]", None, "JSON object"),
        (b"{}", "3", "outside the body"),
        (b"{}", "-1", "outside the body"),
        (b"{}", "x", "not a number"),
    ],
)
def test_message_framing_is_checked(body, length, match):
    with pytest.raises(InvalidInputError, match=match):
        codec.split_message(body, length)


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_deeply_nested_data_is_refused(depth):
    body = (
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": '
        + b"[" * depth
        + b"1"
        + b"]" * depth
        + b"}]}"
    )
    with pytest.raises(InvalidInputError):
        codec.decode_request(body, None)


def test_json_answers_are_written_from_the_arrays_memory_and_read_back_exactly():
    request = codec.InferRequest({}, None, False)
    floats = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    outputs = {
        "f": floats,
        "big_endian": floats.astype(">f4"),  # orjson cannot write these from memory: lists instead
        "strided": floats[:, ::2],
        "bf16": np.array([1.5, -2.25], datatypes.BFLOAT16),
        "nan": np.array([np.nan, 1.0], np.float32),
        "b": np.array([True, False]),
        "u64": np.array([2**64 - 1], np.uint64),
    }
    body, length = codec.encode_response("m", outputs, request)
    assert length is None and b"NaN" in body and b"18446744073709551615" in body
    assert b"0.10000000149011612" not in codec.encode_response("m", {"f": np.array([0.1], np.float32)}, request)[0]
    decoded = codec.decode_response(body, None)
    for name, array in outputs.items():
        assert decoded[name].dtype == array.dtype.newbyteorder("=") and decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], array)  # bit for bit: float32 written shortest, read exactly


def test_nan_and_inf_pass_through_json():
    array = np.array([np.nan, np.inf, -np.inf], np.float32)
    np.testing.assert_equal(_round_trip({"f": array}, False).inputs["f"], array)


@settings(max_examples=60, deadline=None)
@given(
    array=hnp.arrays(
        st.sampled_from([np.float32, np.int64, np.uint8, np.float16, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=4, max_side=5),
    ),
    binary=st.booleans(),
)
def test_any_array_round_trips_exactly(array, binary):
    got = _round_trip({"t": array}, binary).inputs["t"]
    assert got.shape == array.shape and got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=200), length=st.one_of(st.none(), st.integers(-5, 300).map(str), st.text(max_size=5)))
def test_arbitrary_bytes_never_crash_the_decoder(body, length):
    try:
        codec.decode_request(body, length)
    except InvalidInputError:
        pass
