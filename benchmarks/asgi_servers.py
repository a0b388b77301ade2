"""The device server's HTTP floor: uvicorn (httptools, uvloop: what `serve` runs) against Granian (Rust, hyper).

Granian is not a dependency of the project; run this with a Python that has it:

    python -m venv --system-site-packages .venv-granian && .venv-granian/bin/pip install granian
    PYTHONPATH=. .venv-granian/bin/python -m benchmarks.asgi_servers [--rounds 4] [--seconds 2]

Without granian it says so and exits 0. Four servers run side by side on loopback: a bare ASGI app
(reads the body, writes a fixed answer the size of the tiny model's) and the device server's own
app serving the tiny ONNX model, each under uvicorn and under Granian. Raw-socket clients (the same
binary infer request on kept-alive sockets, closed loop, 1/4/16 client threads, the answer parsed
by httptools) drive each for a window; every round runs every server in each cell, the order
rotated from round to round. A window gives requests/s and the server's CPU per request (user +
system of the server process and its children, from /proc). Then the request-head cases of
tests/test_hardening_http.py run against the device app under each server, Granian's configured
with its own limits (`--http1-buffer-size`, `--http1-header-read-timeout`) at the values uvicorn's
`server/http_limits.py` enforces.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.servers import stop_process

MAX_HEAD_BYTES = 64 * 1024  # server/http_limits.py's cap
HEAD_TIMEOUT_S = 1.0  # the hardening tests' --head-timeout
CLIENTS = (1, 4, 16)
STORE_ENV = "ARACHNE_BENCH_ASGI_STORE"
_ANSWER = b"\x00" * 64  # the tiny model's binary answer is 64 bytes of tensor after its JSON


async def bare_app(scope, receive, send):
    """The floor: read the body, answer a fixed body (no routing, no model)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % len(_ANSWER))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _ANSWER})


def device_app():
    """The device server's app over the store named by $ARACHNE_BENCH_ASGI_STORE (Granian's factory)."""
    from arachne_mlflow.server.app import create_app

    return create_app(os.environ[STORE_ENV])


# -- servers ---------------------------------------------------------------------------------------


def _granian_command(target: str, port: int, factory: bool) -> list[str]:
    command = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--http", "1", "--workers", "1", "--no-access-log", "--log-level", "warning"]
    command += [
        "--http1-buffer-size",
        str(MAX_HEAD_BYTES),
        "--http1-header-read-timeout",
        str(int(HEAD_TIMEOUT_S * 1000)),
    ]
    return command + (["--factory"] if factory else []) + [target]


def _commands(port: int, store: Path) -> dict[str, list[str]]:
    uvicorn_bare = [sys.executable, "-m", "uvicorn", "benchmarks.asgi_servers:bare_app", "--port", str(port)]
    uvicorn_bare += ["--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning"]
    ours = [sys.executable, "-m", "arachne_mlflow.server", "--port", str(port), "--model-store", str(store)]
    ours += ["--log-level", "warning", "--head-timeout", str(HEAD_TIMEOUT_S)]
    return {
        "bare app, uvicorn": uvicorn_bare,
        "bare app, granian": _granian_command("benchmarks.asgi_servers:bare_app", port, False),
        "device server, uvicorn": ours,
        "device server, granian": _granian_command("benchmarks.asgi_servers:device_app", port, True),
    }


@contextmanager
def _server(name: str, tmp: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    from benchmarks.servers import free_port

    port = free_port()
    store = tmp / name.replace(" ", "_").replace(",", "")
    env = {**os.environ, STORE_ENV: str(store), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(
        _commands(port, store)[name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_port(port, process)
        yield port, process
    finally:
        stop_process(process)


def _wait_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(f"{process.args} did not answer within {timeout} s")


# -- load ------------------------------------------------------------------------------------------


def _request(port: int, model: str) -> bytes:
    import numpy as np

    from arachne_mlflow.protocol import codec

    body, header_length = codec.encode_request({"x": np.ones((1, 16), np.float32)})
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Length: {len(body)}\r\n{codec.HEADER_LENGTH}: {header_length}\r\n\r\n"
    )
    return head.encode() + body


def _raw_caller(port: int, request: bytes) -> Callable[[], int]:
    """One kept-alive socket sending `request`; a call returns the answer's status."""
    import httptools

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    class Done:
        complete = False

        def on_message_complete(self):
            self.complete = True

    def call() -> int:
        done = Done()
        parser = httptools.HttpResponseParser(done)
        sock.sendall(request)
        while not done.complete:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            parser.feed_data(data)
        return parser.get_status_code()

    return call


def _window(port: int, pid: int, request: bytes, clients: int, seconds: float) -> dict:
    from benchmarks.load import process_tree_cpu

    counts = [0] * clients
    failures: list[str] = []
    start_line = threading.Barrier(clients + 1)
    stop_at = [time.perf_counter() + 3600]

    def worker(i: int) -> None:
        call = _raw_caller(port, request)
        call()
        start_line.wait()
        while time.perf_counter() < stop_at[0]:
            status = call()
            if status != 200:
                failures.append(str(status))
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    cpu_before, began = process_tree_cpu(pid), time.perf_counter()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed, cpu = time.perf_counter() - began, process_tree_cpu(pid) - cpu_before
    if failures:
        raise RuntimeError(f"answers other than 200: {sorted(set(failures))}")
    total = sum(counts)
    return {"requests_per_s": total / elapsed, "server_cpu_us": cpu / max(total, 1) * 1e6}


def measure(servers: dict[str, tuple[int, int, bytes]], rounds: int, seconds: float) -> dict:
    """Interleaved windows: {clients: {server: [window, ...]}}."""
    names = list(servers)
    results: dict[int, dict[str, list[dict]]] = {c: {n: [] for n in names} for c in CLIENTS}
    for r in range(rounds):
        for clients in CLIENTS:
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                port, pid, request = servers[name]
                results[clients][name].append(_window(port, pid, request, clients, seconds))
                print(f"round {r + 1}, {clients} clients, {name}: {results[clients][name][-1]}", file=sys.stderr)
    return results


# -- request heads (tests/test_hardening_http.py's cases) ---------------------------------------


def _flood(port: int, first: bytes, filler: bytes, limit: int) -> int:
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(first)
            while sent < limit:
                sock.sendall(filler)
                sent += len(filler)
        except OSError:
            pass
    return sent


def _status_line(reply: bytes) -> str:
    return reply.split(b"\r\n", 1)[0].decode("latin-1") or "(closed, no answer)"


def head_cases(port: int, pid: int) -> dict[str, dict]:
    """Each case: what the server did and whether the bound held (as the hardening tests assert it)."""
    cases = {}
    mib = 1024 * 1024
    for kind, first, filler in (
        ("endless head: header lines", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", b"a: b\r\n" * 10_000),
        ("endless head: url", b"GET /v2/health/live?", b"a" * 65_536),
    ):
        sent = _flood(port, first, filler, 48 * mib)
        cases[kind] = {"observed": f"took {sent / mib:.1f} MiB before closing", "held": sent < 16 * mib}
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"b" * 70_000)
        try:
            reply = sock.recv(4096)
        except OSError as err:
            reply = repr(err).encode()
    cases["70 KB head answered 431"] = {"observed": _status_line(reply), "held": reply.startswith(b"HTTP/1.1 431 ")}
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 60_000 + b"\r\n\r\n")
        reply = sock.recv(4096)
    cases["60 KB head answered 200"] = {"observed": _status_line(reply), "held": reply.startswith(b"HTTP/1.1 200 ")}
    cases["trickling and silent heads closed"] = _trickle(port)
    cases["idle kept-alive connection closed"] = _idle_after_request(port)
    return cases


def _trickle(port: int) -> dict:
    """50 heads trickling a byte every 0.2 s and one silent socket: closed within 20 s (timeout 1 s)?"""
    silent = socket.create_connection(("127.0.0.1", port), timeout=30)
    trickling = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(50)]
    for sock in trickling:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    began, deadline = time.monotonic(), time.monotonic() + 20
    closed: dict[int, float] = {}
    while time.monotonic() < deadline and len(closed) < len(trickling):
        for i, sock in enumerate(trickling):
            if i not in closed:
                try:
                    sock.send(b"X")
                except OSError:
                    closed[i] = time.monotonic() - began
        time.sleep(0.2)
    silent.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        silent_reply: bytes | None = silent.recv(4096)
    except TimeoutError:
        silent_reply = None
    for sock in [silent, *trickling]:
        sock.close()
    held = len(closed) == len(trickling) and silent_reply is not None
    when = f"after {max(closed.values()):.1f} s" if closed else ""
    silent_text = "still open" if silent_reply is None else _status_line(silent_reply)
    return {"observed": f"{len(closed)}/50 trickling closed {when}; silent: {silent_text}", "held": held}


def _idle_after_request(port: int) -> dict:
    """A kept-alive connection that has one whole answer and then sends nothing: closed within 20 s?"""
    import httptools

    class Done:
        complete = False

        def on_message_complete(self):
            self.complete = True

    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        done = Done()
        parser = httptools.HttpResponseParser(done)
        while not done.complete:
            parser.feed_data(sock.recv(4096))
        began = time.monotonic()
        try:
            rest = sock.recv(4096)
            observed = f"closed after {time.monotonic() - began:.1f} s" + (f" ({_status_line(rest)})" if rest else "")
            held = True
        except TimeoutError:
            observed, held = "still open after 20 s", False
    return {"observed": observed, "held": held}


# -- report ----------------------------------------------------------------------------------------


def markdown(results: dict, heads: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| clients | server | requests/s (median) | server CPU per request | granian / uvicorn requests/s |",
        "|---|---|---|---|---|",
    ]
    for clients, by_server in results.items():
        for name, windows in by_server.items():
            rps = statistics.median(w["requests_per_s"] for w in windows)
            cpu = statistics.median(w["server_cpu_us"] for w in windows)
            ratio = ""
            if name.endswith("granian"):
                base = by_server[name.replace("granian", "uvicorn")]
                ratios = [g["requests_per_s"] / u["requests_per_s"] for g, u in zip(windows, base)]
                ratio = f"{statistics.median(ratios):.2f}x"
            lines.append(f"| {clients} | {name} | {rps:.0f} | {cpu:.0f} µs | {ratio} |")
    lines += ["", "| request-head case | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for case in next(iter(heads.values())):
        cells = [f"{'held' if h[case]['held'] else '**not held**'}: {h[case]['observed']}" for h in heads.values()]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asgi_servers", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one window")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("granian") is None:
        print("granian is not installed in this Python: nothing to compare (see this module's docstring)")
        return 0
    from arachne_mlflow import runtime
    from benchmarks import models

    tiny = str(models.tiny_onnx(models.CACHE / "tiny.onnx"))
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        servers, modules = {}, []
        for name in _commands(0, Path(tmp)):
            port, process = stack.enter_context(_server(name, Path(tmp)))
            model = "tiny"
            if name.startswith("device"):
                modules.append(runtime.init("onnx", model_file=tiny, rpc_info={"host": "127.0.0.1", "port": port}))
                stack.callback(modules[-1].done)
                model = modules[-1].model_name
            servers[name] = (port, process.pid, _request(port, model))
        results = measure(servers, args.rounds, args.seconds)
        heads = {name: head_cases(port, pid) for name, (port, pid, _) in servers.items() if name.startswith("device")}
    table = markdown(results, heads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "asgi_servers.json").write_text(json.dumps({"results": results, "heads": heads}, indent=1))
    (args.out / "asgi_servers.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
