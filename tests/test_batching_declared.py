"""Dynamic batching only where a model declares that its first dimension is a batch, and a request
above `max_batch_size` refused: a real server process under concurrent tritonclient clients."""

from __future__ import annotations

import io
import statistics
import tarfile
import threading
import time

import httpx2
import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.runtime.onnx import ONNXRuntimeModule
from arachne_mlflow.server.store import ModelStore
from tests.helpers import models
from tests.helpers.model_dirs import runtime_details, write_model_dir
from tests.helpers.servers import ServerProcess

HANG = 60.0  # seconds: only catches a server that never answers
CLIENTS = 6
BIG_ROWS = 40_000


def _tar(directory) -> io.BufferedReader:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    buffer.seek(0)
    return io.BufferedReader(buffer)


def _put(store, root, name, onnx_model, batching=None):
    """Write `onnx_model` as a model directory (its MLmodel's `arachne.batching` set when given) and store it."""
    path = root / f"{name}.onnx"
    path.write_bytes(onnx_model.SerializeToString())
    directory = write_model_dir(root / name, "onnx", path, runtime_details("onnx", path))
    if batching is not None:
        mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
        mlmodel["flavors"]["arachne"]["batching"] = batching
        (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    store.put(name, _tar(directory))
    return ONNXRuntimeModule(str(path))


def _infer(triton, model, x, binary=True):
    request = httpclient.InferInput("x", list(x.shape), "FP32")
    request.set_data_from_numpy(x, binary_data=binary)
    return triton.infer(model, [request]).as_numpy("y")


def _full_log(server) -> str:
    return (server.store.parent / f"server-{server.port}.log").read_text(errors="replace")


def _concurrently(target, count):
    """Run `target(i)` in `count` threads released together; the errors they collected."""
    errors, start_line = [], threading.Barrier(count)

    def run(i):
        try:
            start_line.wait(HANG)
            target(i)
        except Exception as err:  # noqa: BLE001 (reported by the test)
            errors.append(f"client {i}: {err!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG)
    return errors


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server with `--batching` server-wide over: a model whose first dimension is not a batch (it
    declares nothing), an MLP that declares a batch and leaves the batcher to the server, and an MLP
    that batches with its own settings."""
    root = tmp_path_factory.mktemp("declared")
    store = ModelStore(root / "store")
    store.open()
    modules = {
        "rows": _put(store, root, "rows", models.onnx_rows_not_a_batch()),
        "mlp_declared": _put(
            store, root, "mlp_declared", models.onnx_mlp(), {"max_batch_size": 4, "dynamic_batching": False}
        ),
        "mlp_own": _put(
            store, root, "mlp_own", models.onnx_mlp(), {"max_batch_size": 8, "max_queue_delay_microseconds": 20_000}
        ),
    }
    store.close()
    flags = ["--log-level", "info", "--batching", "16,50000"]
    server = ServerProcess(root / "store", extra_args=flags).start()
    yield server, modules
    server.stop()
    for module in modules.values():
        module.done()


def test_server_wide_flag_leaves_a_model_that_declares_no_batch_unbatched(served):
    server, modules = served
    rows = modules["rows"]

    def client(i):
        rng = np.random.default_rng(i)
        with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as triton:
            for n in (3, 1, 2, 5):
                x = rng.standard_normal((n, 4)).astype(np.float32)
                got = _infer(triton, "rows", x, binary=i % 2 == 0)
                if not np.array_equal(got, rows.infer([x])[0]):
                    raise AssertionError(f"{n} rows: the answer depends on another client's rows")

    assert _concurrently(client, CLIENTS) == []
    config = httpx2.get(f"{server.url}/v2/models/rows/config").json()
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert "declares no batch" in config["parameters"]["arachne.batching"]["string_value"]
    assert [d["dims"] for d in config["input"]] == [[-1, 4]]
    assert "model 'rows': --batching 16,50000 does not apply" in _full_log(server)
    metrics = httpx2.get(f"{server.url}/metrics").text
    assert 'arachne_batch_size_count{model="rows"}' not in metrics


def test_server_wide_flag_batches_a_model_that_declares_a_batch(served):
    server, modules = served
    mlp = modules["mlp_declared"]

    def client(i):
        rng = np.random.default_rng(100 + i)
        with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as triton:
            for n in (1, 2, 1):
                x = rng.standard_normal((n, 256)).astype(np.float32)
                if not np.array_equal(_infer(triton, "mlp_declared", x), mlp.infer([x])[0]):
                    raise AssertionError("the answer differs from the unbatched run")

    assert _concurrently(client, CLIENTS) == []
    config = httpx2.get(f"{server.url}/v2/models/mlp_declared/config").json()
    # the server's delay; its size capped by the model's own max_batch_size
    assert config["max_batch_size"] == 4 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 50_000
    assert "parameters" not in config and [d["dims"] for d in config["input"]] == [[256]]
    own = httpx2.get(f"{server.url}/v2/models/mlp_own/config").json()
    assert own["max_batch_size"] == 8 and own["dynamic_batching"]["max_queue_delay_microseconds"] == 20_000
    metrics = httpx2.get(f"{server.url}/metrics").text
    count = [line for line in metrics.splitlines() if line.startswith('arachne_batch_size_count{model="mlp_declared"}')]
    assert count and float(count[0].split()[-1]) < CLIENTS * 3  # some requests shared a run


def test_a_request_above_max_batch_size_is_refused_and_small_ones_stay_fast(served):
    server, modules = served
    small = np.ones((1, 256), dtype=np.float32)
    big = np.ones((BIG_ROWS, 256), dtype=np.float32)
    url = f"127.0.0.1:{server.port}"
    with httpclient.InferenceServerClient(url) as triton:
        alone = []
        for _ in range(5):
            start = time.perf_counter()
            _infer(triton, "mlp_own", small)
            alone.append(time.perf_counter() - start)
    baseline = statistics.median(alone)
    refusals, latencies = [], []

    def client(i):
        with httpclient.InferenceServerClient(url, network_timeout=HANG, connection_timeout=HANG) as triton:
            for _ in range(3):
                if i == 0:
                    try:
                        _infer(triton, "mlp_own", big)
                    except InferenceServerException as err:
                        refusals.append(err)
                else:
                    start = time.perf_counter()
                    np.testing.assert_array_equal(
                        _infer(triton, "mlp_own", small), modules["mlp_own"].infer([small])[0]
                    )
                    latencies.append(time.perf_counter() - start)

    assert _concurrently(client, 4) == []
    assert len(refusals) == 3 and len(latencies) == 9
    for refused in refusals:
        assert refused.status() == "400"
        assert refused.message() == "inference request batch-size must be <= 8 for 'mlp_own'"
    # wide margins for a busy machine: without the refusal a 1-row request waits behind the 40,000 rows' run
    assert max(latencies) < 1.0 + 10 * baseline, (baseline, latencies)


def test_a_batch_is_declared_at_save_time_and_checked(tmp_path):
    from arachne_mlflow.flavors import onnx as onnx_flavor
    from arachne_mlflow.model.directory import read_model_dir

    declared = {"max_batch_size": 8, "dynamic_batching": False}
    onnx_flavor.save_model(models.onnx_mlp(), tmp_path / "mlp", batching=declared)
    assert read_model_dir(tmp_path / "mlp").batching == declared
    assert read_model_dir(tmp_path / "mlp").mlmodel["flavors"]["arachne"]["batching"] == declared
    onnx_flavor.save_model(models.onnx_mlp(), tmp_path / "plain")
    assert read_model_dir(tmp_path / "plain").batching is None
    with pytest.raises(InvalidInputError, match="dynamic leading"):
        onnx_flavor.save_model(models.onnx_linear(1), tmp_path / "fixed", batching={"max_batch_size": 4})
    with pytest.raises(InvalidInputError, match="unknown keys"):
        onnx_flavor.save_model(models.onnx_mlp(), tmp_path / "typo", batching={"max_batch_size": 4, "delay": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp", "plain"]  # a refused save leaves nothing
