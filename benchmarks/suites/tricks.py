"""What each hot-path trick buys: the same call with the trick and without it, interleaved.

A trick stays only where it pays for what it costs a reader (docs/performance.md gives the
verdicts). Each row is "with" (the baseline, the code as it is) against "without" (the plain way),
so a ratio above 1 is what the trick saves:

- the per-instance single-input/output `_infer` of TFLite, against the general loop;
- onnxruntime's public `run` (kept: it falls back to the CPU provider when one fails at run
  time), against the C++ session's `run` it wraps;
- the codec's kept layouts of repeated binary headers, against parsing each header (a whole
  encode-decode cycle of a request and its response, both ends);
- metrics as plain numbers exported by a collector, against prometheus_client's own counters
  and histogram, per request;
- the client's kernel-kept socket timeouts, against Python's socket timeouts, on a round trip.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from arachne_mlflow import runtime
from arachne_mlflow.runtime import random_tensor
from benchmarks.servers import device_server
from benchmarks.timing import interleaved, row


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    rounds, number = (5, 50) if quick else (40, 2000)
    rows = [
        _single_io(models["tiny/tflite"], rounds, number),
        _onnx_public_run(models["tiny/onnx"], rounds, number),
        _codec_layouts(rounds, number),
        _metrics_collector(rounds, number),
    ]
    rows.append(_kernel_timeouts(models["tiny/onnx"], rounds, max(10, number // 10)))
    return rows


def _call(module: runtime.RuntimeModule, x: np.ndarray):
    def call():
        module.set_input(0, x)
        module.run()
        return module.get_output(0)

    return call


def _compare(case: str, with_trick, without_trick, rounds: int, number: int, check: bool = True) -> dict:
    if check:
        np.testing.assert_equal(with_trick(), without_trick())
    series = interleaved({"with": with_trick, "without": without_trick}, rounds=rounds, number=number)
    return row("tricks", case, series["with"], series["without"])


def _single_io(kwargs: dict[str, Any], rounds: int, number: int) -> dict:
    ours, plain = runtime.init(**kwargs), runtime.init(**kwargs)
    del plain._infer  # the class's general loop instead of the instance's single-I/O method
    x = random_tensor(ours.input_specs[0])
    return _compare("tflite: single-I/O _infer vs the general loop", _call(ours, x), _call(plain, x), rounds, number)


def _onnx_public_run(kwargs: dict[str, Any], rounds: int, number: int) -> dict:
    ours, native = runtime.init(**kwargs), runtime.init(**kwargs)
    native._run = native._session._sess.run
    x = random_tensor(ours.input_specs[0])
    return _compare(
        "onnx: public run (EP fallback) vs the C++ session's run", _call(ours, x), _call(native, x), rounds, number
    )


@contextmanager
def _no_layout_caches():
    from arachne_mlflow.protocol import codec

    saved = codec._cached_layout, codec._remember, codec._remember_layout
    codec._cached_layout = lambda *args: None
    codec._remember = codec._remember_layout = lambda *args: None
    try:
        yield
    finally:
        codec._cached_layout, codec._remember, codec._remember_layout = saved


def _codec_cycle():
    """Client encodes a request, server decodes it and encodes the answer, client decodes it."""
    from arachne_mlflow.protocol import codec

    x = np.arange(16, dtype=np.float32).reshape(1, 16)

    def cycle():
        parts, length = codec.request_parts({"x": x})
        request = codec.decode_request(b"".join(parts), length)
        body, length = codec.encode_response("tiny", {"y": request.inputs["x"]}, request, "1")
        return codec.decode_response(body, length)["y"]

    return cycle


def _codec_layouts(rounds: int, number: int) -> dict:
    cycle = _codec_cycle()

    def without():
        with _no_layout_caches():
            return cycle()

    return _compare(
        "codec: kept layouts of repeated headers vs parsing each (both ends)", cycle, without, rounds, number
    )


def _metrics_collector(rounds: int, number: int) -> dict:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from arachne_mlflow.server.metrics import LATENCY_BUCKETS, ModelSeries, RequestTimes

    series = ModelSeries()
    times = RequestTimes(time.perf_counter_ns())  # (ours also keeps Triton's statistics of the request)
    registry = CollectorRegistry()
    requests = Counter("r", "r", ["model"], registry=registry).labels("tiny")
    latency = Histogram("l", "l", ["model"], buckets=LATENCY_BUCKETS, registry=registry).labels("tiny")

    def ours():
        series.succeeded(times)

    def prometheus():
        requests.inc()
        latency.observe(0.0003)

    return _compare(
        "metrics: plain numbers + collector vs prometheus_client per request",
        ours,
        prometheus,
        rounds,
        number,
        check=False,
    )


def _kernel_timeouts(kwargs: dict[str, Any], rounds: int, number: int) -> dict:
    from arachne_mlflow.client import transport

    with tempfile.TemporaryDirectory() as tmp, device_server(Path(tmp) / "store") as (port, _, _):
        rpc = {"host": "127.0.0.1", "port": port}
        ours = runtime.init(**kwargs, rpc_info=rpc)
        plain = runtime.init(**kwargs, rpc_info=rpc)
        x = random_tensor(ours.input_specs[0])
        _call(ours, x)()
        plain._client._transport.close()  # its next connection is made without kernel timeouts
        transport._KERNEL_TIMEOUTS, kept = False, transport._KERNEL_TIMEOUTS
        try:
            _call(plain, x)()
        finally:
            transport._KERNEL_TIMEOUTS = kept
        result = _compare(
            "client: kernel socket timeouts vs Python's, tiny remote round trip",
            _call(ours, x),
            _call(plain, x),
            rounds,
            number,
        )
        plain.done()
        ours.done()
    return result
