"""Dynamic batching: the batcher driven directly with real onnxruntime models, the server's batched
infer in-process and as a real process under concurrent tritonclient clients, the batching metrics,
and the access log's default."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import tarfile
import threading
import time

import httpx2
import numpy as np
import pytest
import yaml

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import codec
from arachne_mlflow.runtime.onnx import ONNXRuntimeModule
from arachne_mlflow.server.app import create_app
from arachne_mlflow.server.batching import Batcher, BatchingPolicy, BatchingSettings, batchable
from arachne_mlflow.server.main import add_arguments
from arachne_mlflow.server.store import ModelStore
from tests.helpers import models
from tests.helpers.model_dirs import runtime_details, write_model_dir
from tests.helpers.servers import ServerProcess

HANG = 30.0  # seconds: only catches a batcher that never answers


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching-models")
    files = {}
    for name, model in {
        "mlp": models.onnx_mlp(),
        "any_shape": models.onnx_any_shape(),
        "lookup": models.onnx_lookup(),
        "fixed": models.onnx_linear(1),
    }.items():
        files[name] = root / f"{name}.onnx"
        files[name].write_bytes(model.SerializeToString())
    return files


@pytest.fixture(scope="module")
def modules(onnx_files):
    loaded = {name: ONNXRuntimeModule(str(path)) for name, path in onnx_files.items()}
    yield loaded
    for module in loaded.values():
        module.done()


def _drive(module, settings, requests, gaps=None):
    """Submit `requests` (lists of arrays) to a Batcher over `module`, run in a thread pool as the
    server does; returns (answers or exceptions, the batcher)."""

    async def main():
        loop = asyncio.get_running_loop()
        pool = concurrent.futures.ThreadPoolExecutor(2)

        async def run(inputs):
            return await loop.run_in_executor(pool, module.infer, inputs)

        batcher = Batcher(settings, run)

        async def one(i, inputs):
            if gaps:
                await asyncio.sleep(gaps[i])
            return await batcher.submit(inputs)

        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*[one(i, r) for i, r in enumerate(requests)], return_exceptions=True), HANG
            )
        finally:
            pool.shutdown()
        return answers, batcher

    return asyncio.run(main())


def _batches(batcher) -> int:
    return sum(batcher.stats.size_counts)


# -- settings and which models batch ---------------------------------------------------


def test_settings_read_and_bounded():
    settings = BatchingSettings.from_config(
        {"max_batch_size": 16, "preferred_batch_size": [8, 4, 8], "max_queue_delay_microseconds": 500}
    )
    assert settings == BatchingSettings(16, (4, 8), 500)
    assert settings.to_config() == {
        "max_batch_size": 16,
        "dynamic_batching": {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 500},
    }
    assert BatchingSettings.from_flag("8,250") == BatchingSettings(8, (), 250)
    assert BatchingSettings.from_flag("4") == BatchingSettings(4)
    for bad in (
        {"max_batch_size": 0},
        {"max_batch_size": 10**9},
        {"max_batch_size": True},
        {"max_batch_size": 4, "preferred_batch_size": [8]},
        {"max_batch_size": 4, "max_queue_delay_microseconds": -1},
        {"max_batch_size": 4, "timeout": 3},
        {"preferred_batch_size": [1]},
        [4],
    ):
        with pytest.raises(InvalidInputError):
            BatchingSettings.from_config(bad)
    for bad in ("", "x", "4,5,6", "-1"):
        with pytest.raises(InvalidInputError):
            BatchingSettings.from_flag(bad)


def test_policy_flags_over_the_model_and_only_models_that_declare_a_batch(modules):
    mlp, fixed = modules["mlp"], modules["fixed"]
    assert batchable(mlp.input_specs, mlp.output_specs) and not batchable(fixed.input_specs, fixed.output_specs)
    policy = BatchingPolicy.from_flags(["8,100", "mine=4", "never=off"])
    own = {"max_batch_size": 2}
    declared = {"max_batch_size": 4, "preferred_batch_size": [2], "dynamic_batching": False}
    specs = (mlp.input_specs, mlp.output_specs)
    # the server-wide flag: not for a model that declares no batch, however dynamic its first dimension
    assert policy.settings_for("other", None, *specs) is None and "declares no batch" in policy.skipped["other"]
    assert policy.settings_for("other", own, *specs) == BatchingSettings(2) and "other" not in policy.skipped
    assert policy.settings_for("decl", declared, *specs) == BatchingSettings(4, (), 100)  # capped by the model's
    assert BatchingPolicy().settings_for("decl", declared, *specs) is None  # the batcher is the server's to turn on
    assert policy.settings_for("mine", own, *specs) == BatchingSettings(4)  # a flag naming it over the model's
    assert policy.settings_for("mine", None, *specs) == BatchingSettings(4)  # (the operator's word for it)
    assert policy.settings_for("never", own, *specs) is None and "never" not in policy.skipped
    assert policy.settings_for("other", None, fixed.input_specs, fixed.output_specs) is None
    assert policy.settings_for("mine", None, fixed.input_specs, fixed.output_specs) is None
    for config in (own, declared):
        with pytest.raises(InvalidInputError, match="dynamic leading"):
            policy.settings_for("other", config, fixed.input_specs, fixed.output_specs)
    with pytest.raises(InvalidInputError, match="dynamic_batching"):
        policy.settings_for("other", {"max_batch_size": 2, "dynamic_batching": "no"}, *specs)
    assert BatchingPolicy().settings_for("any", None, *specs) is None  # off unless asked for
    assert BatchingPolicy().skipped == {}
    with pytest.raises(InvalidInputError):
        BatchingPolicy.from_flags(["=4"])


# -- the batcher with real models ------------------------------------------------------


def test_mixed_batch_sizes_answer_exactly_what_each_request_alone_gets(modules, rng):
    mlp = modules["mlp"]
    sizes = [1, 3, 1, 2, 5, 1, 4, 1]
    requests = [[rng.standard_normal((n, 256)).astype(np.float32)] for n in sizes]
    answers, batcher = _drive(mlp, BatchingSettings(8), requests)
    for request, answer in zip(requests, answers):
        np.testing.assert_array_equal(answer[0], mlp.infer(request)[0], strict=True)
    assert _batches(batcher) < len(requests)  # requests were merged
    assert batcher.stats.rows == sum(sizes)


def test_requests_of_another_shape_run_alone_and_too_many_rows_are_refused(modules, rng):
    any_shape = modules["any_shape"]
    requests = [[rng.standard_normal(shape).astype(np.float32)] for shape in [(2, 3), (1, 5), (1, 3), (9, 3)]]
    answers, batcher = _drive(any_shape, BatchingSettings(8), requests)
    for request, answer in zip(requests[:3], answers):
        np.testing.assert_array_equal(answer[0], any_shape.infer(request)[0], strict=True)
    # (2,3) and (1,3) share a batch; (1,5) has another width; (9,3) has more rows than max_batch_size
    assert isinstance(answers[3], InvalidInputError) and answers[3].status_code == 400
    assert str(answers[3]) == "inference request batch-size must be <= 8 for 'model'"  # Triton's words
    assert _batches(batcher) == 2 and batcher.stats.rows == 4
    start = time.perf_counter()
    answers, _ = _drive(any_shape, BatchingSettings(8, (), 5_000_000), [[np.ones((0, 3), np.float32)]])
    assert time.perf_counter() - start < 4.0  # a request that can join no batch does not wait the 5 s delay
    assert answers[0][0].shape == (0, 3)


def test_a_failing_request_in_a_batch_fails_alone(modules):
    lookup = modules["lookup"]
    requests = [[np.array([[i]], dtype=np.int64)] for i in (1, 2, 99, 3)]
    answers, batcher = _drive(lookup, BatchingSettings(4), requests)
    assert isinstance(answers[2], Exception) and "out of data bounds" in str(answers[2])
    for i, answer in zip((1, 2, 3), (answers[0], answers[1], answers[3])):
        np.testing.assert_array_equal(answer[0], lookup.infer([np.array([[i]], dtype=np.int64)])[0], strict=True)


def test_a_lone_request_waits_the_queue_delay_and_no_longer(modules, rng):
    mlp = modules["mlp"]
    x = [rng.standard_normal((1, 256)).astype(np.float32)]
    start = time.perf_counter()
    [answer], batcher = _drive(mlp, BatchingSettings(8, (), 200_000), [x])
    assert time.perf_counter() - start >= 0.2  # held for others to join, as long as the delay
    np.testing.assert_array_equal(answer[0], mlp.infer(x)[0], strict=True)
    assert batcher.stats.queue_counts[-1] == 0  # waited under 1 s (the last bucket's bound)
    # a second request arriving during the first's delay joins it, and both leave by its deadline
    answers, batcher = _drive(mlp, BatchingSettings(8, (), 200_000), [x, x], gaps=[0, 0.05])
    assert _batches(batcher) == 1 and batcher.stats.rows == 2
    assert 0.2 <= batcher.stats.queue_sum < 0.2 + 0.2 + HANG


def test_full_or_preferred_batches_do_not_wait(modules, rng):
    mlp = modules["mlp"]
    x = [rng.standard_normal((2, 256)).astype(np.float32)]
    for settings in (BatchingSettings(4, (), 5_000_000), BatchingSettings(8, (4,), 5_000_000)):
        start = time.perf_counter()
        answers, batcher = _drive(mlp, settings, [x, x])
        assert time.perf_counter() - start < 4.0  # not the 5 s delay
        assert _batches(batcher) == 1 and batcher.stats.rows == 4


# -- the server, in-process ------------------------------------------------------------


def _tar(directory) -> io.BufferedReader:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    buffer.seek(0)
    return io.BufferedReader(buffer)


def _model_dir(root, name, onnx_file, batching=None):
    directory = write_model_dir(root / name, "onnx", onnx_file, runtime_details("onnx", onnx_file))
    if batching is not None:
        mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
        mlmodel["flavors"]["arachne"]["batching"] = batching
        (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return directory


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, onnx_files):
    """A model store holding the MLP twice (batched by its MLmodel, and not) and the lookup model."""
    root = tmp_path_factory.mktemp("batching-store")
    store = ModelStore(root / "store")
    store.open()
    own = {"max_batch_size": 8, "max_queue_delay_microseconds": 20_000}
    store.put("mlp", _tar(_model_dir(root, "mlp", onnx_files["mlp"], own)))
    store.put("mlp_alone", _tar(_model_dir(root, "mlp_alone", onnx_files["mlp"])))
    store.put("lookup", _tar(_model_dir(root, "lookup", onnx_files["lookup"])))
    store.close()
    return root / "store"


def _serve(store_dir, flags, scenario):
    """Run `scenario(http client, dataplane)` against the app over `store_dir`, lifespan included."""
    app = create_app(str(store_dir), batching=BatchingPolicy.from_flags(flags))

    async def main():
        async with app.app.router.lifespan_context(app.app):
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://server") as client:
                return await asyncio.wait_for(scenario(client, app.state.dataplane), HANG)

    return asyncio.run(main())


async def _infer(client, model, inputs, binary=True):
    body, header_length = codec.encode_request(inputs, binary=binary)
    headers = {} if header_length is None else {codec.HEADER_LENGTH: str(header_length)}
    response = await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    if response.status_code != 200:
        return response.status_code, response.json()["error"]
    return 200, codec.decode_response(response.content, response.headers.get(codec.HEADER_LENGTH))


def test_server_batches_concurrent_requests_and_refuses_a_bad_one_alone(store_dir, modules, rng):
    mlp = modules["mlp"]
    sizes = [1, 2, 1, 3, 1, 1]
    inputs = [rng.standard_normal((n, 256)).astype(np.float32) for n in sizes]
    bad = rng.standard_normal((1, 255)).astype(np.float32)  # another width: refused before it joins

    async def scenario(client, dataplane):
        calls = [_infer(client, "mlp", {"x": x}, binary=i % 2 == 0) for i, x in enumerate(inputs)]
        calls.insert(3, _infer(client, "mlp", {"x": bad}))
        answers = await asyncio.gather(*calls)
        metrics = (await client.get("/metrics")).text
        return answers, metrics, dataplane.store.get("mlp").batching, dataplane.store.get("mlp_alone").batching

    answers, metrics, batching, alone = _serve(store_dir, [], scenario)
    status, error = answers.pop(3)
    assert status == 400 and "expected shape" in error
    for x, (status, outputs) in zip(inputs, answers):
        assert status == 200
        np.testing.assert_array_equal(outputs["y"], mlp.infer([x])[0], strict=True)
    assert batching == BatchingSettings(8, (), 20_000) and alone is None  # what the config route reports
    assert 'arachne_batch_size_count{model="mlp"}' in metrics
    count = _sample(metrics, 'arachne_batch_size_count{model="mlp"}')
    assert 1 <= count < len(inputs) and _sample(metrics, 'arachne_batch_size_sum{model="mlp"}') == sum(sizes)
    assert _sample(metrics, 'arachne_batch_queue_seconds_count{model="mlp"}') == len(inputs)
    assert 'model="mlp_alone"' not in metrics.split("arachne_batch_size")[1]


def test_server_flag_batches_a_model_and_a_failing_request_fails_alone(store_dir, modules):
    lookup = modules["lookup"]

    async def scenario(client, dataplane):
        calls = [_infer(client, "lookup", {"index": np.array([[i]], dtype=np.int64)}) for i in (4, 99, 5, 6)]
        return await asyncio.gather(*calls), dataplane.store.get("lookup").batching

    answers, batching = _serve(store_dir, ["lookup=4,20000", "mlp=off"], scenario)
    assert batching == BatchingSettings(4, (), 20_000)
    assert answers[1][0] == 500 and "out of data bounds" in answers[1][1]
    for i, (status, outputs) in zip((4, 5, 6), (answers[0], answers[2], answers[3])):
        assert status == 200
        np.testing.assert_array_equal(outputs["y"], lookup.infer([np.array([[i]], dtype=np.int64)])[0], strict=True)


def test_a_model_that_asks_for_batching_but_cannot_is_refused_at_upload(tmp_path, onnx_files):
    store = ModelStore(tmp_path / "store")
    store.open()
    with pytest.raises(InvalidInputError, match="dynamic leading"):
        store.put("fixed", _tar(_model_dir(tmp_path, "fixed", onnx_files["fixed"], {"max_batch_size": 4})))
    with pytest.raises(InvalidInputError, match="unknown keys"):
        store.put("mlp", _tar(_model_dir(tmp_path, "mlp", onnx_files["mlp"], {"max_batch_size": 4, "x": 1})))
    assert store.index() == [] and sorted(p.name for p in (tmp_path / "store").iterdir()) == [".arachne-model-store"]


def _sample(metrics: str, series: str) -> float:
    [line] = [line for line in metrics.splitlines() if line.startswith(series + " ")]
    return float(line.split()[-1])


# -- a real server under concurrent tritonclient clients -------------------------------


@pytest.mark.slow
def test_real_server_with_concurrent_tritonclient_clients(tmp_path, onnx_files, modules):
    import tritonclient.http as httpclient

    mlp = modules["mlp"]
    store = ModelStore(tmp_path / "store")
    store.open()
    store.put("mlp", _tar(_model_dir(tmp_path, "mlp", onnx_files["mlp"])))
    store.close()
    server = ServerProcess(tmp_path / "store", extra_args=["--batching", "mlp=16,20000"]).start()
    errors, start_line = [], threading.Barrier(8)

    def client(seed):
        rng = np.random.default_rng(seed)
        with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as triton:
            start_line.wait()
            for n in (1, 2, 1, 3):
                x = rng.standard_normal((n, 256)).astype(np.float32)
                request = httpclient.InferInput("x", list(x.shape), "FP32")
                request.set_data_from_numpy(x, binary_data=seed % 2 == 0)
                got = triton.infer("mlp", [request]).as_numpy("y")
                if not np.array_equal(got, mlp.infer([x])[0]):
                    errors.append(f"client {seed}: answer differs from the unbatched run")

    try:
        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG)
        metrics = httpx2.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    assert not errors
    assert _sample(metrics, 'arachne_batch_size_sum{model="mlp"}') == 8 * 7
    assert _sample(metrics, 'arachne_batch_size_count{model="mlp"}') < 8 * 4  # some requests shared a run


# -- the access log --------------------------------------------------------------------


def test_access_log_is_off_by_default():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).access_log is False
    assert parser.parse_args(["--access-log"]).access_log is True


@pytest.mark.slow
@pytest.mark.parametrize("flag", [[], ["--access-log"]])
def test_access_lines_only_with_the_flag_and_errors_always(tmp_path, flag):
    server = ServerProcess(tmp_path / "store", extra_args=["--log-level", "info", *flag]).start()
    try:
        assert httpx2.get(f"{server.url}/v2/health/ready").status_code == 200
        assert httpx2.post(f"{server.url}/v2/models/nothing/infer", content=b"{}").status_code == 404
    finally:
        server.stop()
    log = server.read_log()
    assert ('"GET /v2/health/ready HTTP/1.1" 200' in log) == bool(flag)
    assert "POST /v2/models/nothing/infer: 404 no model 'nothing'" in log
