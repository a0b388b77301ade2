"""Remote inference through the device server on loopback, against local runs and `mlflow models serve`.

- MobileNetV2 (one 602 KB input): the remote runtime (binary tensors, keep-alive) against the
  same model run locally; the target is <= 1.15x. The earlier gRPC remote runtime measured
  1.79x on this kind of machine (16.5 ms a call).
- The same model behind `mlflow models serve` with JSON (`{"inputs": ...}`), the alternative a
  user would pick: we must be at least 50x faster.
- The tiny model: a remote round trip against an empty request (`/v2/health/live`) on the same
  server, <= 1.5x: what the protocol adds to a request is small. The same infer request written
  on a raw socket, measured beside them, splits what is added between server and client.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import requests

from arachne_mlflow import runtime
from arachne_mlflow.protocol import codec
from arachne_mlflow.runtime import random_tensor
from benchmarks.servers import device_server, mlflow_scoring_server
from benchmarks.timing import interleaved, row

TARGET_REMOTE_RATIO = 1.15
TARGET_VS_MLFLOW = 50.0
TARGET_EMPTY_RATIO = 1.5


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, device_server(Path(tmp) / "store") as (port, _, _):
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
            remote.done()
            local.done()
    return rows


def _call(module, x):
    def call():
        module.set_input(0, x)
        module.run()
        return module.get_output(0)

    return call


def _remote_vs_local(local, remote, x, quick: bool) -> dict:
    series = interleaved(
        {"local onnx": _call(local, x), "remote onnx": _call(remote, x)},
        rounds=5 if quick else 30,
        number=2 if quick else 10,
    )
    result = row("remote", f"mobilenet/onnx ({x.nbytes // 1000} KB input)", series["local onnx"], series["remote onnx"])
    result.update(
        target=f"ratio <= {TARGET_REMOTE_RATIO} (old gRPC: 1.79x)", met=result["ratio_median"] <= TARGET_REMOTE_RATIO
    )
    return result


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
