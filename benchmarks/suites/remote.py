"""Remote inference through the device server on loopback, against local runs and `mlflow models serve`.

- MobileNetV2 (one 602 KB input): the remote runtime (binary tensors, keep-alive) against the
  same model run locally, ONNX and TFLite (LiteRT with its default of one thread, then with one
  per core, the same on both sides);
  the target is <= 1.15x. The earlier gRPC remote runtime measured 1.79x on this kind of machine
  (16.5 ms a call). Beside each, where the server's share of a remote call goes: its own timings
  per request (Triton's statistics: queue, decode, inference, encode) against the local call.
- The same model behind `mlflow models serve` with JSON (`{"inputs": ...}`), the alternative a
  user would pick: we must be at least 50x faster.
- The tiny model: a remote round trip against an empty request (`/v2/health/live`) on the same
  server, <= 1.5x: what the protocol adds to a request is small. The same infer request written
  on a raw socket, measured beside them, splits what is added between server and client.
- Both models over the server's gRPC port against binary REST and local, with tritonclient's gRPC
  and HTTP clients (one client family, so the protocols are what differ) and the remote runtime.
- Triton's perf_analyzer against the server over HTTP and gRPC, where it can run (its wheel needs
  glibc >= 2.38; elsewhere the rows say it was skipped and why).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import requests

from arachne_mlflow import runtime
from arachne_mlflow.protocol import codec
from arachne_mlflow.runtime import random_tensor
from benchmarks.servers import device_server, free_port, mlflow_scoring_server
from benchmarks.timing import interleaved, row

TARGET_REMOTE_RATIO = 1.15
TARGET_VS_MLFLOW = 50.0
TARGET_EMPTY_RATIO = 1.5


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    rows = []
    grpc_port = free_port()
    with (
        tempfile.TemporaryDirectory() as tmp,
        device_server(Path(tmp) / "store", ("--grpc-port", str(grpc_port), "--shm-regions", "4")) as (port, _, _),
    ):
        rpc = {"host": "127.0.0.1", "port": port}
        for model in ("mobilenet", "tiny"):
            kwargs = models[f"{model}/onnx"]
            local = runtime.init(**kwargs)
            remote = runtime.init(**kwargs, rpc_info=rpc)
            x = random_tensor(local.input_specs[0])
            np.testing.assert_equal(local.infer([x])[0], remote.infer([x])[0])
            if model == "mobilenet":
                rows.append(_remote_vs_local(local, remote, x, quick))
                rows.append(_remote_vs_mlflow_serve(kwargs["model_file"], remote, x, Path(tmp), quick))
            else:
                rows.extend(_tiny_vs_empty(remote, x, port, quick))
            rows.extend(_grpc_vs_rest(model, local, remote, x, port, grpc_port, quick))
            if model == "tiny":
                rows.extend(_perf_analyzer(remote.model_name, port, grpc_port, Path(tmp), quick))
            remote.done()
            local.done()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        # LiteRT's default (one thread), then one per core, then that through shared memory (a co-located client)
        for threads, shared in ((None, False), (cores, False), (cores, True)):
            rpc_of = {**rpc, "shared_memory": True} if shared else rpc
            rows.extend(_remote_vs_local_tflite(models["mobilenet/tflite"], threads, rpc_of, port, quick))
    return rows


def _remote_vs_local_tflite(kwargs: dict, threads: int | None, rpc: dict, port: int, quick: bool) -> list[dict]:
    """Both sides with the same `num_threads` (None: LiteRT's default), which the remote module
    sends with the model."""
    if threads is not None:
        kwargs = {**kwargs, "num_threads": threads}
    local = runtime.init(**kwargs)
    remote = runtime.init(**kwargs, rpc_info=rpc)
    try:
        x = random_tensor(local.input_specs[0])
        np.testing.assert_equal(local.infer([x])[0], remote.infer([x])[0])
        result = _remote_vs_local(local, remote, x, quick)
        if threads is not None:
            result["case"] += f", num_threads={threads}"
        if rpc.get("shared_memory"):
            result["case"] += ", input through shared memory"
        return [result, _server_stages(port, remote.model_name, result)]
    finally:
        remote.done()
        local.done()


def _call(module, x):
    def call():
        module.set_input(0, x)
        module.run()
        return module.get_output(0)

    return call


def _remote_vs_local(local, remote, x, quick: bool) -> dict:
    name = local.runtime_name
    series = interleaved(
        {f"local {name}": _call(local, x), f"remote {name}": _call(remote, x)},
        rounds=5 if quick else 30,
        number=2 if quick else 10,
    )
    case = f"mobilenet/{name} ({x.nbytes // 1000} KB input)"
    result = row("remote", case, series[f"local {name}"], series[f"remote {name}"])
    result.update(
        target=f"ratio <= {TARGET_REMOTE_RATIO} (old gRPC: 1.79x)", met=result["ratio_median"] <= TARGET_REMOTE_RATIO
    )
    return result


def _server_stages(port: int, model: str, compared: dict) -> dict:
    """The server's own time per request (its statistics over the calls so far) beside the local call."""
    stats = requests.get(f"http://127.0.0.1:{port}/v2/models/{model}/stats", timeout=30).json()
    figures = stats["model_stats"][0]["inference_stats"]
    per_request = {key: figures[key]["ns"] / max(figures[key]["count"], 1) / 1e3 for key in _STAGES}
    return {
        "suite": "remote",
        "case": f"{compared['case']}: the server's time per request (µs)",
        **{f"{key}_us": value for key, value in per_request.items()},
        "local_call_us": compared["baseline_ms"]["median_ms"] * 1e3,
        "remote_call_us": compared["candidate_ms"]["median_ms"] * 1e3,
    }


_STAGES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def _remote_vs_mlflow_serve(onnx_file: str, remote, x, tmp: Path, quick: bool) -> dict:
    import mlflow.onnx
    import onnx

    model_dir = tmp / "mlflow_onnx"
    mlflow.onnx.save_model(onnx.load(onnx_file), str(model_dir))
    body = json.dumps({"inputs": x.tolist()})
    session = requests.Session()
    with mlflow_scoring_server(model_dir) as port:
        url = f"http://127.0.0.1:{port}/invocations"

        def mlflow_call():
            response = session.post(url, data=body, headers={"Content-Type": "application/json"})
            response.raise_for_status()
            return response

        expected = remote.infer([x])[0]
        predictions = mlflow_call().json()["predictions"]
        if isinstance(predictions, dict):  # MLflow's ONNX pyfunc answers {output name: values}
            [predictions] = predictions.values()
        got = np.asarray(predictions, dtype=np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        series = interleaved(
            {"mlflow models serve (JSON)": mlflow_call, "arachne remote": _call(remote, x)},
            rounds=3 if quick else 10,
            number=1,
            warmup=1,
        )
    result = row(
        "remote",
        "mobilenet/onnx vs mlflow models serve",
        series["mlflow models serve (JSON)"],
        series["arachne remote"],
        json_request_mb=round(len(body) / 1e6, 2),
    )
    speedup = 1 / result["ratio_median"]
    result.update(target=f"at least {TARGET_VS_MLFLOW:.0f}x faster", met=speedup >= TARGET_VS_MLFLOW, speedup=speedup)
    return result


def _raw_request(port: int, request: bytes):
    """`request` written as it is on a kept-alive socket, the response only parsed by httptools:
    no client library."""
    import socket

    import httptools

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    class Done:
        complete = False

        def on_message_complete(self):
            self.complete = True

    def call():
        done = Done()
        parser = httptools.HttpResponseParser(done)
        sock.sendall(request)
        while not done.complete:
            parser.feed_data(sock.recv(65536))

    return call, sock


def _tiny_vs_empty(remote, x, port: int, quick: bool) -> list[dict]:
    """The target: the whole remote call against the cheapest request the server answers (a fixed
    GET). Beside it, the same infer request written on a raw socket: the server's share."""
    host = f"Host: 127.0.0.1:{port}\r\n"
    empty, empty_sock = _raw_request(port, f"GET /v2/health/live HTTP/1.1\r\n{host}\r\n".encode())
    body, header_length = codec.encode_request({remote.input_specs[0].name: x})
    head = (
        f"POST /v2/models/{remote.model_name}/infer HTTP/1.1\r\n{host}"
        f"Content-Length: {len(body)}\r\n{codec.HEADER_LENGTH}: {header_length}\r\n\r\n"
    )
    raw_infer, infer_sock = _raw_request(port, head.encode() + body)
    candidates = {"empty request": empty, "infer on a raw socket": raw_infer, "remote tiny run": _call(remote, x)}
    series = interleaved(candidates, rounds=5 if quick else 30, number=5 if quick else 100)
    empty_sock.close()
    infer_sock.close()
    result = row("remote", "tiny/onnx round trip", series["empty request"], series["remote tiny run"])
    result.update(target=f"ratio <= {TARGET_EMPTY_RATIO}", met=result["ratio_median"] <= TARGET_EMPTY_RATIO)
    server_share = row(
        "remote",
        "tiny/onnx round trip, server's share (no client library)",
        series["empty request"],
        series["infer on a raw socket"],
    )
    return [result, server_share]


def _grpc_vs_rest(model: str, local, remote, x, port: int, grpc_port: int, quick: bool) -> list[dict]:
    """The same request over gRPC and binary REST (tritonclient both), the remote runtime and local."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    name, input_name = remote.model_name, local.input_specs[0].name
    expected = local.infer([x])[0]
    calls = {"local onnx": _call(local, x), "remote runtime (REST binary)": _call(remote, x)}
    clients = []
    for label, module, url in (
        ("tritonclient.http (binary)", httpclient, f"127.0.0.1:{port}"),
        ("tritonclient.grpc", grpcclient, f"127.0.0.1:{grpc_port}"),
    ):
        client = module.InferenceServerClient(url)
        clients.append(client)
        tensor = module.InferInput(input_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        calls[label] = _triton_call(client, name, [tensor])
        np.testing.assert_equal(calls[label]().as_numpy(remote.output_specs[0].name), expected)
    big = model == "mobilenet"
    if not big:  # what gRPC itself costs a call, as the empty request does for REST
        calls["empty gRPC call (ServerLive)"] = clients[-1].is_server_live
    number = (2 if quick else 10) if big else (5 if quick else 100)
    series = interleaved(calls, rounds=5 if quick else 30, number=number)
    for client in clients:
        client.close()
    case = f"{model}/onnx ({x.nbytes // 1000} KB input)" if big else f"{model}/onnx round trip"
    grpc_series = series["tritonclient.grpc"]
    rows = [
        row("remote", f"{case}, gRPC vs local", series["local onnx"], grpc_series),
        row("remote", f"{case}, gRPC vs REST binary", series["tritonclient.http (binary)"], grpc_series),
        row("remote", f"{case}, gRPC vs the remote runtime", series["remote runtime (REST binary)"], grpc_series),
    ]
    if not big:
        rows.append(
            row("remote", f"{case}, gRPC vs an empty gRPC call", series["empty gRPC call (ServerLive)"], grpc_series)
        )
    return rows


def _triton_call(client, name: str, inputs: list):
    def call():
        return client.infer(name, inputs)

    return call


PERF_ANALYZER_GLIBC = (2, 38)


def _perf_analyzer_unavailable() -> str | None:
    """Why Triton's perf_analyzer cannot run here, or None."""
    if os.environ.get("ARACHNE_PERF_ANALYZER"):
        return None
    libc, version = platform.libc_ver()
    if libc == "glibc" and tuple(int(p) for p in version.split(".")[:2]) < PERF_ANALYZER_GLIBC:
        return (
            f"the perf-analyzer wheel needs glibc >= {'.'.join(map(str, PERF_ANALYZER_GLIBC))}, "
            f"this machine has {version} (pip installs a placeholder); set ARACHNE_PERF_ANALYZER to a "
            "wrapper that runs it with a newer loader (docs/performance.md)"
        )
    if _perf_analyzer_binary() is None:
        return "perf_analyzer is not installed (pip install perf-analyzer)"
    return None


def _perf_analyzer_binary() -> str | None:
    """$ARACHNE_PERF_ANALYZER (a wrapper for an older glibc), else the wheel's binary."""
    return (
        os.environ.get("ARACHNE_PERF_ANALYZER")
        or shutil.which("perf_analyzer")
        or shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
    )


# perf_analyzer's modes against the server: its protocol and extra flags.
PERF_ANALYZER_MODES = {
    "HTTP": ("http", ()),
    "gRPC": ("grpc", ()),
    "gRPC --streaming": ("grpc", ("--streaming",)),
    "HTTP --shared-memory=system": ("http", ("--shared-memory=system",)),
    "gRPC --shared-memory=system": ("grpc", ("--shared-memory=system",)),
}


def _perf_analyzer(name: str, port: int, grpc_port: int, tmp: Path, quick: bool) -> list[dict]:
    """perf_analyzer's own load (one client, one request at a time) in each of its modes."""
    reason = _perf_analyzer_unavailable()
    rows = []
    for mode, (protocol, flags) in PERF_ANALYZER_MODES.items():
        case = f"tiny/onnx perf_analyzer over {mode}"
        if reason is not None:
            rows.append({"suite": "remote", "case": case, "skipped": reason})
            continue
        url = f"127.0.0.1:{port if protocol == 'http' else grpc_port}"
        report = tmp / f"perf_analyzer_{len(rows)}.csv"
        command = [_perf_analyzer_binary(), "-m", name, "-u", url, "-i", protocol, "--concurrency-range", "1", *flags]
        command += ["--measurement-interval", "1000" if quick else "5000", "-f", str(report)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            rows.append({"suite": "remote", "case": case, "failed": done.stdout[-500:] + done.stderr[-500:]})
            continue
        with open(report, newline="") as file:
            [figures] = list(csv.DictReader(file))
        rows.append(
            {
                "suite": "remote",
                "case": case,
                "inferences_per_s": float(figures["Inferences/Second"]),
                "p50_latency_us": float(figures["p50 latency"]),
                "p99_latency_us": float(figures["p99 latency"]),
            }
        )
    return rows
