"""Capture segments: samples round-trip exactly, and a torn or damaged tail ends a segment cleanly."""

from __future__ import annotations

import numpy as np
import pytest

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.spec import BFLOAT16
from arachne_mlflow.protocol import capture_format
from arachne_mlflow.protocol.capture_format import Sample, closed_segments, encode_sample, iter_samples


def _sample(i: int = 0, **tensors: np.ndarray) -> Sample:
    inputs = tensors or {"x": np.arange(6, dtype=np.float32).reshape(2, 3) + i}
    return Sample(
        model="tiny",
        revision="3",
        device="edge-1",
        timestamp=1_700_000_000.25 + i,
        inputs=inputs,
        outputs={"y": np.array([[i, 2 * i]], dtype=np.int64)},
        meta={"rule": "rate", "request_id": f"r{i}"},
    )


def _assert_same(got: Sample, sent: Sample) -> None:
    assert (got.model, got.revision, got.device, got.timestamp, got.meta) == (
        sent.model,
        sent.revision,
        sent.device,
        sent.timestamp,
        sent.meta,
    )
    for got_tensors, sent_tensors in ((got.inputs, sent.inputs), (got.outputs, sent.outputs)):
        assert list(got_tensors) == list(sent_tensors)
        for name, array in sent_tensors.items():
            assert got_tensors[name].dtype == array.dtype.newbyteorder("=")  # values kept, in native order
            assert got_tensors[name].shape == array.shape
            assert got_tensors[name].tolist() == array.tolist()


def _write(path, samples) -> list[bytes]:
    records = [encode_sample(sample) for sample in samples]
    path.write_bytes(b"".join(records))
    return records


@pytest.mark.parametrize(
    "tensors",
    [
        {"x": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)},
        {"image": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)},
        {"ids": np.array([[-(2**62), 0, 2**62]], dtype=np.int64), "scalar": np.array(7, dtype=np.int64)},
        {"text": np.array([b"a", b"", b"\xff\x00bin"], dtype=object)},
        {"text": np.array([["caf\u00e9", ""], ["x", "\u6f22"]], dtype=object)},
        {"half": np.array([1.5, -2.0], dtype=np.float16), "bf": np.array([1.0, 2.5], dtype=BFLOAT16)},
        {"big_endian": np.array([1.0, 2.0], dtype=">f4"), "empty": np.zeros((0, 3), dtype=np.float32)},
    ],
)
def test_samples_round_trip(tmp_path, tensors):
    path = tmp_path / capture_format.segment_name(1)
    samples = [_sample(0, **tensors), _sample(1, **tensors)]
    _write(path, samples)
    got = list(iter_samples(path))
    assert len(got) == 2
    for decoded, sent in zip(got, samples):
        _assert_same(decoded, sent)


def test_bytes_items_keep_their_type(tmp_path):
    path = tmp_path / capture_format.segment_name(1)
    _write(path, [_sample(0, b=np.array([b"x"], dtype=object), s=np.array(["x"], dtype=object))])
    (got,) = iter_samples(path)
    assert isinstance(got.inputs["b"][0], bytes) and isinstance(got.inputs["s"][0], str)


def test_outputs_may_be_empty(tmp_path):
    path = tmp_path / capture_format.segment_name(1)
    sent = Sample("m", "1", "d", 1.0, {"x": np.ones(2, np.float32)})
    path.write_bytes(encode_sample(sent))
    (got,) = iter_samples(path)
    assert got.outputs == {} and got.meta == {}


def test_a_torn_tail_at_every_offset_ends_the_segment_after_the_whole_records(tmp_path):
    path = tmp_path / capture_format.segment_name(1)
    records = _write(path, [_sample(i) for i in range(3)])
    whole = b"".join(records[:2])
    last = records[2]
    for cut in range(len(last)):
        path.write_bytes(whole + last[:cut])
        got = list(iter_samples(path))
        assert [sample.timestamp for sample in got] == [_sample(0).timestamp, _sample(1).timestamp], cut
        assert capture_format.valid_length(path) == len(whole)
    path.write_bytes(whole + last)
    assert len(list(iter_samples(path))) == 3


def test_a_flipped_byte_ends_the_segment_at_the_damaged_record(tmp_path):
    path = tmp_path / capture_format.segment_name(1)
    records = _write(path, [_sample(i) for i in range(3)])
    start = len(records[0])
    for offset in (0, 5, capture_format.HEADER.size + 3, len(records[1]) - 1):
        data = bytearray(b"".join(records))
        data[start + offset] ^= 0x41
        path.write_bytes(bytes(data))
        got = list(iter_samples(path))
        assert [sample.timestamp for sample in got] == [_sample(0).timestamp], offset
        assert capture_format.valid_length(path) == start


def test_a_header_claiming_a_huge_payload_is_a_torn_tail(tmp_path):
    path = tmp_path / capture_format.segment_name(1)
    header = capture_format.HEADER.pack(capture_format.MAGIC, capture_format.MAX_RECORD_BYTES + 1, 0)
    path.write_bytes(encode_sample(_sample(0)) + header)
    assert len(list(iter_samples(path))) == 1


def test_a_well_framed_but_malformed_payload_is_refused(tmp_path):
    path = tmp_path / capture_format.segment_name(1)
    payload = capture_format.encode_payload(_sample(0))
    lying = bytearray(payload)
    lying[-20:] = b"\xff" * 20  # the last tensor's lengths now run past the end
    for bad in (bytes(lying), payload + b"extra", b"\x09" + payload[1:]):
        path.write_bytes(capture_format.encode_record(bad))
        with pytest.raises(InvalidInputError, match="capture record"):
            list(iter_samples(path))


def test_a_bytes_tensor_claiming_more_items_than_it_holds_is_refused_before_allocating(tmp_path):
    path = tmp_path / capture_format.segment_name(1)
    payload = capture_format.encode_payload(_sample(0, t=np.array([b"x"], dtype=object)))
    count_at = payload.index(b"BYTES") + len(b"BYTES") + 1  # the first (only) dimension
    forged = payload[:count_at] + (2**40).to_bytes(8, "little") + payload[count_at + 8 :]
    path.write_bytes(capture_format.encode_record(forged))
    with pytest.raises(InvalidInputError, match="claims"):
        list(iter_samples(path))


def test_segment_names_and_closed_segments(tmp_path):
    assert capture_format.segment_name(42) == "seg-000000000042.cap"
    assert capture_format.segment_sequence("seg-000000000042.cap") == 42
    for bad in ("seg-42.cap", "../seg-000000000042.cap", "seg-000000000042.cap.tmp", "x"):
        with pytest.raises(InvalidInputError):
            capture_format.segment_sequence(bad)
    with pytest.raises(InvalidInputError):
        capture_format.segment_name(0)
    assert closed_segments(tmp_path / "missing") == []
    for sequence in (3, 1, 2):
        (tmp_path / capture_format.segment_name(sequence)).write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    (tmp_path / "seg-000000000009.cap.tmp").write_bytes(b"")
    assert [path.name for path in closed_segments(tmp_path)] == ["seg-000000000001.cap", "seg-000000000002.cap"]
    assert closed_segments(tmp_path / capture_format.segment_name(1)) == []
