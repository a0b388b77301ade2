"""`ModelStreamInfer` for ordinary models, with tritonclient.grpc's stream API against a server on
loopback: one answer per request, in order; errors in the answer, the stream going on; the token
checked before a message is read; each stream's requests in flight and message size bounded."""

from __future__ import annotations

import asyncio
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from arachne_mlflow.flavors import onnx as onnx_flavor
from arachne_mlflow.server import grpc_service
from tests.helpers import models
from tests.helpers.servers import ThreadServer

TOKEN = "stream-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
REQUESTS = 100
WAIT = 60  # seconds for any one answer (a busy 2-core box)


@pytest.fixture(scope="module")
def linear_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream-models") / "linear"
    onnx_flavor.save_model(models.onnx_linear("N"), path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, linear_dir):
    running = ThreadServer(tmp_path_factory.mktemp("stream") / "store", token=TOKEN).start()
    yield running.deploy({"linear": linear_dir})
    running.stop()


@pytest.fixture
def client(server):
    triton = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield triton
    triton.stop_stream()
    triton.close()


def _inputs(x):
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def _answers(answers: queue.Queue, count: int) -> list:
    return [answers.get(timeout=WAIT) for _ in range(count)]


def _expected(linear_dir, x):
    from tests.helpers.v2 import local_outputs

    return local_outputs(linear_dir, {"x": x})["y"]


def test_a_stream_of_100_requests_gets_100_ordered_answers(client, linear_dir):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=AUTH)
    xs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(REQUESTS)]
    for i, x in enumerate(xs):
        client.async_stream_infer("linear", _inputs(x), request_id=str(i))
    received = _answers(answers, REQUESTS)
    assert [error for _, error in received] == [None] * REQUESTS
    assert [result.get_response().id for result, _ in received] == [str(i) for i in range(REQUESTS)]
    for (result, _), x in zip(received, xs):
        np.testing.assert_allclose(result.as_numpy("y"), _expected(linear_dir, x), rtol=1e-6)
    assert answers.empty()


def test_a_failed_request_is_answered_and_the_stream_goes_on(client):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=AUTH)
    x = np.ones((1, 4), np.float32)
    client.async_stream_infer("linear", _inputs(x), request_id="a")
    client.async_stream_infer("nope", _inputs(x), request_id="b")
    client.async_stream_infer("linear", _inputs(np.ones((1, 5), np.float32)), request_id="c")
    client.async_stream_infer("linear", _inputs(x), request_id="d")
    (first, none), (_, unknown), (_, bad_shape), (last, none_again) = _answers(answers, 4)
    assert none is None and none_again is None
    assert first.get_response().id == "a" and last.get_response().id == "d"
    assert isinstance(unknown, InferenceServerException) and "'nope'" in unknown.message()
    assert isinstance(bad_shape, InferenceServerException) and "shape" in bad_shape.message()


def test_the_token_is_checked_before_any_message(client):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))  # no token, no message
    result, error = answers.get(timeout=WAIT)  # the stream is refused before it sends any message
    assert result is None and "UNAUTHENTICATED" in str(error)
    with pytest.raises(InferenceServerException, match="no longer in valid state"):
        client.async_stream_infer("linear", _inputs(np.ones((1, 4), np.float32)))


def test_sequence_parameters_are_refused_on_the_stream(client):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=AUTH)
    x = np.ones((1, 4), np.float32)
    client.async_stream_infer("linear", _inputs(x), sequence_id=7, sequence_start=True)
    client.async_stream_infer("linear", _inputs(x))
    (_, refused), (answered, none) = _answers(answers, 2)
    assert "sequence batching is not supported" in refused.message() and none is None and answered is not None


def test_a_message_naming_a_region_goes_to_the_shared_memory_codec(client):
    """The stream dispatches as ModelInfer does: on this server (shared memory off) a tensor in a region
    gets the extension's own refusal, not the plain codec's, and the stream goes on (the regions
    themselves: tests/test_shared_memory.py)."""
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=AUTH)
    in_region = grpcclient.InferInput("x", [1, 4], "FP32")
    in_region.set_shared_memory("some_region", 16)
    client.async_stream_infer("linear", [in_region])
    client.async_stream_infer("linear", _inputs(np.ones((1, 4), np.float32)))
    (_, refused), (answered, none) = _answers(answers, 2)
    assert "shared memory is off on this server" in refused.message()
    assert none is None and answered.as_numpy("y") is not None


def test_a_message_over_the_size_limit_ends_the_stream(tmp_path, linear_dir):
    running = ThreadServer(tmp_path / "store", max_request_bytes=64 * 1024).start().deploy({"linear": linear_dir})
    try:
        triton = grpcclient.InferenceServerClient(f"127.0.0.1:{running.grpc_port}")
        answers = queue.Queue()
        triton.start_stream(callback=lambda result, error: answers.put((result, error)))
        triton.async_stream_infer("linear", _inputs(np.ones((1, 4), np.float32)))
        assert answers.get(timeout=WAIT)[1] is None
        triton.async_stream_infer("linear", _inputs(np.ones((8192, 4), np.float32)))  # 128 KiB
        result, error = answers.get(timeout=WAIT)
        assert result is None and "RESOURCE_EXHAUSTED" in str(error)
        triton.stop_stream()
        triton.close()
    finally:
        running.stop()


def test_requests_in_flight_on_a_stream_are_bounded(tmp_path, monkeypatch):
    """With a bound of 4, a stream of 40 requests to a slow model never has more than 4 running."""
    bound = 4
    monkeypatch.setattr(grpc_service, "MAX_CONCURRENT_STREAMS", bound)
    onnx_flavor.save_model(models.onnx_linear_slow(rounds=40), tmp_path / "slow")
    running = ThreadServer(tmp_path / "store").start().deploy({"slow": tmp_path / "slow"})
    dataplane = running.dataplane
    real = dataplane.infer_message
    running_now, most = 0, 0

    async def counted(*args, **kwargs):
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        try:
            await asyncio.sleep(0.01)  # (every request overlaps the next ones, however fast the model)
            return await real(*args, **kwargs)
        finally:
            running_now -= 1

    dataplane.infer_message = counted
    try:
        triton = grpcclient.InferenceServerClient(f"127.0.0.1:{running.grpc_port}")
        answers = queue.Queue()
        triton.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(40):
            triton.async_stream_infer("slow", _inputs(np.full((1, 4), i, np.float32)), request_id=str(i))
        received = _answers(answers, 40)
        triton.stop_stream()
        triton.close()
    finally:
        running.stop()
    assert [result.get_response().id for result, _ in received] == [str(i) for i in range(40)]
    assert 1 < most <= bound
