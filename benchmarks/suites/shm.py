"""System shared memory against binary REST and gRPC, for a co-located client sending 1080p frames.

A 1x3x1080x1920 frame, FP32 (24 MiB) and UINT8 (6 MiB), to a small model (per-channel mean),
from one client on the server's machine, with the standard clients: tritonclient.http with the
frame in a registered region (written there before each call, as a camera process would),
tritonclient.http with binary tensors, tritonclient.grpc; and our own `DeviceClient` with and without
`shared_memory=True`. Interleaved rounds; per candidate, requests/s (one client, closed loop) and
the server's CPU time per request (user + system, /proc), beside the CPU time of the same model
called in this process on the same frame (/proc counts CPU in 10 ms ticks: a round's figure is its
total over `number` calls, divided).

Targets: shared memory at least 3x binary REST's requests/s for the 24 MiB frame, and the server's
CPU per shared memory request within 1.5x of the in-process call.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from arachne_mlflow import runtime
from arachne_mlflow.client import DeviceClient
from benchmarks.load import process_tree_cpu
from benchmarks.servers import device_server, free_port
from benchmarks.timing import Series, compare, row

SHAPE = (1, 3, 1080, 1920)
FRAMES = {"fp32 (24 MiB)": np.float32, "uint8 (6 MiB)": np.uint8}


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    from arachne_mlflow.flavors import onnx as arachne_onnx

    rounds, number = (3, 2) if quick else (12, 10)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        grpc_port = free_port()
        extra = ("--grpc-port", str(grpc_port), "--shm-regions", "8", "--shm-max-mb", "256")
        with device_server(Path(tmp) / "store", extra) as (port, process, _):
            for label, dtype in FRAMES.items():
                name = f"frame_mean_{np.dtype(dtype).name}"
                model_file = _mean_model(Path(tmp) / f"{name}.onnx", dtype)
                arachne_onnx.save_model(str(model_file), str(Path(tmp) / name))
                with DeviceClient("127.0.0.1", port) as client:
                    client.upload_model(name, Path(tmp) / name)
                frame = np.random.default_rng(0).integers(0, 255, SHAPE).astype(dtype)
                rows += _compare(label, name, str(model_file), frame, port, grpc_port, process.pid, rounds, number)
    return rows


def _mean_model(path: Path, dtype: Any) -> Path:
    """x[1,3,1080,1920] -> the mean of each channel, [1,3,1,1] (FP32; a UINT8 frame is cast first)."""
    from onnx import TensorProto, helper

    is_uint8 = np.dtype(dtype) == np.uint8
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT)] if is_uint8 else []
    nodes.append(helper.make_node("ReduceMean", ["xf" if is_uint8 else "x"], ["y"], axes=[2, 3], keepdims=1))
    graph = helper.make_graph(
        nodes,
        "frame_mean",
        [helper.make_tensor_value_info("x", TensorProto.UINT8 if is_uint8 else TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path.write_bytes(model.SerializeToString())
    return path


def _callers(name: str, frame: np.ndarray, port: int, grpc_port: int) -> tuple[dict[str, Callable], Callable]:
    """The candidates (each returns the model's output) and what closes their clients and regions."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import np_to_triton_dtype

    datatype = np_to_triton_dtype(frame.dtype)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    key = f"/arachne-bench-{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region(key[1:], key, frame.nbytes)
    http.register_system_shared_memory(key[1:], key, frame.nbytes)
    ours_shm = DeviceClient("127.0.0.1", port, shared_memory=True)
    ours = DeviceClient("127.0.0.1", port)

    def tritonclient_shm():
        shm.set_shared_memory_region(handle, [frame])
        tensor = httpclient.InferInput("x", list(SHAPE), datatype)
        tensor.set_shared_memory(key[1:], frame.nbytes)
        return http.infer(name, [tensor]).as_numpy("y")

    def binary_rest():
        tensor = httpclient.InferInput("x", list(SHAPE), datatype)
        tensor.set_data_from_numpy(frame, binary_data=True)
        return http.infer(name, [tensor]).as_numpy("y")

    def grpc_call():
        tensor = grpcclient.InferInput("x", list(SHAPE), datatype)
        tensor.set_data_from_numpy(frame)
        return grpc.infer(name, [tensor]).as_numpy("y")

    def close():
        http.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
        for client in (http, grpc, ours_shm, ours):
            client.close()

    candidates = {
        "tritonclient shared memory": tritonclient_shm,
        "tritonclient binary REST": binary_rest,
        "tritonclient gRPC": grpc_call,
        "DeviceClient shared memory": lambda: ours_shm.infer(name, {"x": frame})["y"],
        "DeviceClient binary REST": lambda: ours.infer(name, {"x": frame})["y"],
    }
    return candidates, close


def _compare(
    label: str,
    name: str,
    model_file: str,
    frame: np.ndarray,
    port: int,
    grpc_port: int,
    pid: int,
    rounds: int,
    number: int,
) -> list[dict]:
    candidates, close = _callers(name, frame, port, grpc_port)
    local = runtime.init("onnx", model_file=model_file)
    try:
        expected = local.infer([frame])[0]
        for call in candidates.values():
            np.testing.assert_allclose(call(), expected, rtol=1e-5)
        candidates["in-process"] = lambda: local.infer([frame])[0]
        wall, cpu = _interleaved(candidates, pid, rounds, number)
    finally:
        close()
        local.done()
    return _rows(label, wall, cpu)


def _interleaved(
    candidates: dict[str, Callable], pid: int, rounds: int, number: int
) -> tuple[dict[str, Series], dict[str, Series]]:
    """Per-call wall time of each candidate and the CPU time it cost: the server's for remote calls,
    this process's for the in-process one (one value per round, rotating the order each round)."""
    names = list(candidates)
    wall = {n: Series(n) for n in names}
    cpu = {n: Series(n) for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            clock = time.process_time if n == "in-process" else lambda: process_tree_cpu(pid)
            cpu_before, start = clock(), time.perf_counter()
            for _ in range(number):
                candidates[n]()
            wall[n].times.append((time.perf_counter() - start) / number)
            cpu[n].times.append((clock() - cpu_before) / number)
    return wall, cpu


def _rows(label: str, wall: dict[str, Series], cpu: dict[str, Series]) -> list[dict]:
    def rps(name: str) -> float:
        return 1 / wall[name].median

    def cpu_ms(name: str) -> float:
        return statistics.median(cpu[name].times) * 1e3

    figures = {
        "requests_per_s": {n: round(rps(n), 1) for n in wall},
        "server_cpu_ms_per_request": {n: round(cpu_ms(n), 2) for n in cpu if n != "in-process"},
        "in_process_cpu_ms_per_call": round(cpu_ms("in-process"), 2),
    }
    shm, rest = wall["tritonclient shared memory"], wall["tritonclient binary REST"]
    speedup = 1 / compare(rest, shm)["ratio_median"]  # (medians of the per-round ratios, as every row's)
    cpu_ratio = compare(cpu["in-process"], cpu["tritonclient shared memory"])["ratio_median"]
    is_fp32 = label.startswith("fp32")
    return [
        row(
            "shm",
            f"{label} frame: shared memory vs binary REST (tritonclient)",
            rest,
            shm,
            target=">= 3x binary REST's requests/s" if is_fp32 else None,
            met=speedup >= 3 if is_fp32 else None,
            speedup=round(speedup, 2),
            **figures,
        ),
        row("shm", f"{label} frame: shared memory vs gRPC (tritonclient)", wall["tritonclient gRPC"], shm),
        row(
            "shm",
            f"{label} frame: our client, shared memory vs binary REST",
            wall["DeviceClient binary REST"],
            wall["DeviceClient shared memory"],
        ),
        row(
            "shm",
            f"{label} frame: server CPU per shared memory request vs the model in-process (CPU per call)",
            cpu["in-process"],
            cpu["tritonclient shared memory"],
            target="<= 1.5x in-process",
            met=cpu_ratio <= 1.5,
            cpu_ratio=round(cpu_ratio, 2),
        ),
    ]
