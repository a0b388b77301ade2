"""The device server against the servers a user would pick instead, under the same closed-loop load.

Servers: ours (defaults: no batching, access log off), MLServer 1.7 with mlserver-mlflow,
a KServe 0.21 ModelServer (benchmarks/kserve_onnx.py), and `mlflow models serve`, all on loopback
and all running the same ONNX files with the same onnxruntime settings (benchmarks/peers.py).
Models: the tiny one and the MLP. Cells: 1, 4 and 16 clients, binary tensors and JSON where a
server accepts them: tritonclient for the V2 servers, MLflow's own JSON (`{"inputs": ...}`) for
`mlflow models serve`. A server that answers a cell's first request with an error is reported as
refusing it (MLServer refuses tritonclient's binary tensors, KServe its JSON). Every server's
answer to that first request is compared with onnxruntime's, bit for bit.

Rounds are interleaved: each round runs every cell of every server once, in an order rotated from
round to round; the table gives medians over rounds. Targets: ours ahead in every cell; on the
tiny model with one client, >= 3x the requests/s of MLServer and of KServe.
"""

from __future__ import annotations

import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.runtime import random_tensor
from arachne_mlflow.runtime.onnx import ONNXRuntimeModule
from benchmarks import load, peers
from benchmarks.servers import device_server, mlflow_scoring_process

MODELS = ("tiny", "mlp")
CLIENTS = (1, 4, 16)
ENCODINGS = ("binary", "json")
SERVERS = ("arachne", "mlserver", "kserve", "mlflow serve")
TARGET_VS_PEERS = 3.0


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    import mlflow.onnx
    import onnx

    from arachne_mlflow.flavors import onnx as arachne_onnx

    pythons = peers.ensure_envs()
    rounds, seconds = (1, 0.5) if quick else (3, 3.0)
    files = {name: Path(models[f"{name}/onnx"]["model_file"]) for name in MODELS}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmp = Path(tmp)
        mlflow_dirs = {}
        for name, path in files.items():
            arachne_onnx.save_model(str(path), str(tmp / "arachne" / name))
            mlflow_dirs[name] = tmp / "mlflow" / name
            mlflow.onnx.save_model(onnx.load(str(path)), str(mlflow_dirs[name]), signature=_signature(path))
        port, process, _ = stack.enter_context(device_server(tmp / "store", ("--log-level", "info")))
        with DeviceClient("127.0.0.1", port) as client:
            for name in MODELS:
                client.upload_model(name, tmp / "arachne" / name)
        targets = {("arachne", name): load.Target("arachne", port, process.pid) for name in MODELS}
        port, pid = stack.enter_context(peers.mlserver(pythons["mlserver"], mlflow_dirs, tmp))
        targets.update({("mlserver", name): load.Target("mlserver", port, pid) for name in MODELS})
        port, pid = stack.enter_context(peers.kserve(pythons["kserve"], files))
        targets.update({("kserve", name): load.Target("kserve", port, pid) for name in MODELS})
        for name in MODELS:
            port, process = stack.enter_context(mlflow_scoring_process(mlflow_dirs[name]))
            targets[("mlflow serve", name)] = load.Target("mlflow serve", port, process.pid, kind="mlflow")
        return _measure(targets, files, rounds, seconds)


def _signature(onnx_file: Path):
    """The model's tensor signature (MLServer decodes V2 tensors into arrays only with one)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    module = ONNXRuntimeModule(str(onnx_file))
    specs = [[TensorSpec(s.dtype, s.shape, s.name) for s in side] for side in (module.input_specs, module.output_specs)]
    return ModelSignature(inputs=Schema(specs[0]), outputs=Schema(specs[1]))


def _measure(targets: dict, files: dict[str, Path], rounds: int, seconds: float) -> list[dict]:
    cells: dict[tuple, dict] = {}  # (model, clients, encoding, server) -> caller or refusal
    for name, path in files.items():
        module = ONNXRuntimeModule(str(path))
        x = random_tensor(module.input_specs[0])
        expected = module.infer([x])[0]
        for encoding in ENCODINGS:
            for server in SERVERS:
                target = targets[(server, name)]
                if (target.kind == "mlflow") != (encoding == "json" and server == "mlflow serve"):
                    continue
                make = load.caller(target, name, x, binary=encoding == "binary")
                try:
                    equal = load.check(make, expected)
                except load.Refused as err:
                    cells.update({(name, c, encoding, server): {"refused": str(err)} for c in CLIENTS})
                    continue
                for clients in CLIENTS:
                    cells[(name, clients, encoding, server)] = {"make": make, "equal": equal, "windows": []}
    runnable = [key for key, cell in cells.items() if "make" in cell]
    for r in range(rounds):
        shift = r * len(SERVERS) // max(rounds, 1)
        for key in sorted(runnable, key=lambda k: (k[0], k[1], k[2], (SERVERS.index(k[3]) + shift) % len(SERVERS))):
            cell = cells[key]
            cell["windows"].append(load.run(targets[(key[3], key[0])], cell["make"], key[1], seconds))
    rows = []
    for name in files:
        for clients in CLIENTS:
            for encoding in ENCODINGS:
                rows.append(_row(name, clients, encoding, cells))
    return rows


def _row(name: str, clients: int, encoding: str, cells: dict) -> dict:
    row: dict = {
        "suite": "peers",
        "case": f"{name}, {clients} client{'s' if clients > 1 else ''}, {encoding}",
        "detail": {},
    }
    figures = {}
    for server in SERVERS:
        cell = cells.get((name, clients, encoding, server))
        if cell is None:
            continue
        if "refused" in cell:
            row[server] = "refused"
            row["detail"][server] = cell["refused"]
            continue
        windows = cell["windows"]
        figures[server] = statistics.median(w["requests_per_s"] for w in windows)
        detail = row["detail"][server] = {
            "requests_per_s": figures[server],
            "p99_ms": statistics.median(w["p99_ms"] for w in windows),
            "server_cpu_us": statistics.median(w["server_cpu_us"] for w in windows),
            "outputs_equal": cell["equal"],
            "errors": sum(w["errors"] for w in windows),
        }
        row[server] = (
            f"{detail['requests_per_s']:.0f}/s p99 {detail['p99_ms']:.2f} ms, {detail['server_cpu_us']:.0f} µs CPU"
            + ("" if detail["outputs_equal"] else ", outputs differ")
        )
    ours = figures.pop("arachne")
    row["lead"] = min((ours / other for other in figures.values()), default=float("nan"))
    if name == "tiny" and clients == 1:
        row["target"] = f"ahead of every peer; >= {TARGET_VS_PEERS:.0f}x MLServer and KServe"
        versus = [ours / figures[s] for s in ("mlserver", "kserve") if s in figures]
        row["met"] = row["lead"] > 1 and all(v >= TARGET_VS_PEERS for v in versus)
    else:
        row["target"] = "ahead of every peer"
        row["met"] = row["lead"] > 1
    return row


def markdown(rows: list[dict]) -> str:
    """The peers table: requests/s (p99, server CPU per request) per server and cell, ours' lead over the best peer."""
    lines = [
        "| model, clients, encoding | " + " | ".join(SERVERS) + " | lead over the best peer |",
        "|---|" + "---|" * (len(SERVERS) + 1),
    ]
    for row in rows:
        cells = []
        for server in SERVERS:
            value = row["detail"].get(server)
            if value is None:
                cells.append("")
            elif isinstance(value, str):
                cells.append("refused")
            else:
                mark = "" if value["outputs_equal"] else " (outputs differ)"
                cells.append(
                    f"{value['requests_per_s']:.0f} ({value['p99_ms']:.1f} ms, {value['server_cpu_us']:.0f} µs){mark}"
                )
        lines.append(f"| {row['case']} | " + " | ".join(cells) + f" | {row['lead']:.2f}x |")
    return "\n".join(lines) + "\n"
