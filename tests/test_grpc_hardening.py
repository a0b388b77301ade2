"""The gRPC port against hostile peers (third hardening round), and protocol details real clients trip on.

Attacks run against a real server process (`serve --grpc-port`) with real grpc clients sending raw
bytes, or raw HTTP/2 frames (tests/helpers/raw_h2.py) where a real client cannot misbehave enough;
memory is the server process's resident set.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import requests

from arachne_mlflow.protocol.grpc import inference_pb2 as pb
from arachne_mlflow.protocol.grpc.wire import MAX_FIELDS, MessageTooCostlyError, check_parse_cost
from tests.helpers.raw_h2 import RawGrpcConnection, grpc_message_prefix
from tests.helpers.servers import ServerProcess, free_port, rss_bytes

MiB = 1 << 20
TOKEN = "hardening-secret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def _empty_inputs(size: int) -> bytes:
    """A ModelInferRequest of `size` bytes, all empty `inputs` entries (field 5, length 0)."""
    return b"\x2a\x00" * (size // 2)


def _raw_contents(size: int) -> bytes:
    return b"\x0a\x01m\x3a" + _varint(size) + bytes(size)


@pytest.fixture
def grpc_server(tmp_path):
    """A server process with a token and gRPC (few connections, a short idle timeout)."""
    port = free_port()
    args = ["--grpc-port", str(port), "--grpc-max-connections", "32", "--grpc-idle-timeout", "2"]
    server = ServerProcess(tmp_path / "store", token=TOKEN, extra_args=args).start()
    server.grpc_port = port
    yield server
    server.stop()


def _call(server, body: bytes, metadata=()) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=[("grpc.max_send_message_length", -1)]) as ch:
        try:
            ch.unary_unary(INFER)(body, metadata=metadata, timeout=120)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def _growth(server, attack) -> int:
    """The server's resident memory growth over `attack()` (after a first call warms it)."""
    _call(server, b"")
    before = rss_bytes(server.process.pid)
    attack()
    return rss_bytes(server.process.pid) - before


# -- the token before the message (rows 1 and 2) ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("body", [_empty_inputs(8 * MiB), _raw_contents(128 * MiB)], ids=["empty-inputs", "raw"])
def test_an_unauthenticated_message_is_not_read(grpc_server, body):
    codes = []
    growth = _growth(grpc_server, lambda: codes.append(_call(grpc_server, body)))
    assert codes == [grpc.StatusCode.UNAUTHENTICATED]
    assert growth < 48 * MiB, f"{growth / MiB:.0f} MiB"  # (before: 358 MiB for 8 MiB, 220-386 MiB for 128 MiB)
    assert requests.get(grpc_server.url + "/v2/health/live", timeout=5).status_code == 200


@pytest.mark.slow
def test_an_authenticated_message_of_many_tiny_fields_is_refused_before_parsing(grpc_server):
    codes = []
    growth = _growth(grpc_server, lambda: codes.append(_call(grpc_server, _empty_inputs(8 * MiB), AUTH)))
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert growth < 96 * MiB, f"{growth / MiB:.0f} MiB"  # (the message itself is held; not 40x of it)


def test_the_parse_cost_counts_fields_and_packed_numbers():
    descriptor = pb.ModelInferRequest.DESCRIPTOR
    check_parse_cost(_empty_inputs(2 * MAX_FIELDS), descriptor, 1 << 30)
    with pytest.raises(MessageTooCostlyError, match="fields"):
        check_parse_cost(_empty_inputs(2 * MAX_FIELDS + 2), descriptor, 1 << 30)
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="INT64", shape=[1 << 20]).contents.int64_contents.extend([1] * (1 << 20))
    check_parse_cost(request.SerializeToString(), descriptor, 9 * MiB)
    with pytest.raises(MessageTooCostlyError, match="once parsed"):  # 1 MiB of one-byte varints: 8 MiB parsed
        check_parse_cost(request.SerializeToString(), descriptor, 7 * MiB)
    with pytest.raises(Exception, match="well-formed"):
        check_parse_cost(b"\x2a\x05ab", descriptor, 1 << 30)


# -- partial messages and idle connections (rows 12 and 13) ----------------------------------------
@pytest.mark.slow
def test_partial_messages_on_many_streams_hold_little(grpc_server):
    """20 connections x 100 streams, each the start of a 1 MiB message that never completes."""

    async def attack():
        connections, sent = [], 0
        for _ in range(20):  # each opened when its calls start: the server closes a connection idle for 2 s
            connection = await RawGrpcConnection("127.0.0.1", grpc_server.grpc_port).open()
            connections.append(connection)
            for _ in range(100):
                stream = await connection.start_call(INFER)
                sent += await connection.send(stream, grpc_message_prefix(MiB) + bytes(40_000), timeout=1)
        await asyncio.sleep(2)
        peak = rss_bytes(grpc_server.process.pid)
        for connection in connections:
            await connection.close()
        return sent, peak

    before = rss_bytes(grpc_server.process.pid)
    sent, peak = asyncio.run(attack())
    assert sent > 16 * MiB  # (the attack got its bytes through)
    assert peak - before < 24 * MiB, f"{(peak - before) / MiB:.0f} MiB for {sent / MiB:.0f} MiB sent"


@pytest.mark.slow
def test_idle_grpc_connections_never_take_the_descriptors_rest_needs(grpc_server):
    resource.prlimit(grpc_server.process.pid, resource.RLIMIT_NOFILE, (256, 256))
    silent = []
    try:
        for _ in range(300):  # more than the server's descriptors
            silent.append(socket.create_connection(("127.0.0.1", grpc_server.grpc_port), timeout=5))
        time.sleep(1)
        for _ in range(3):
            assert requests.get(grpc_server.url + "/v2/health/live", timeout=5).status_code == 200
        closed = sum(_closed_by_peer(sock) for sock in silent)
        assert closed >= 300 - 32  # beyond --grpc-max-connections, closed at once
    finally:
        for sock in silent:
            sock.close()

    async def idle_after_handshake():
        connection = await RawGrpcConnection("127.0.0.1", grpc_server.grpc_port).open()
        for _ in range(100):  # --grpc-idle-timeout 2: told to go away, then closed
            if connection.goaway or connection.is_closed:
                break
            await asyncio.sleep(0.1)
        await connection.close()
        return connection.goaway or connection.is_closed

    assert asyncio.run(idle_after_handshake())


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1 << 16) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


# -- protocol details ------------------------------------------------------------------------------
_BOTH_IN_ONE_PROCESS = """
import {first}, {second}
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from tests.helpers.servers import ThreadServer

server = ThreadServer(sys.argv[1]).start()
try:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{{server.grpc_port}}")
    assert client.is_server_live() and client.get_server_metadata().name == "arachne-mlflow"
    try:
        client.infer("nope", [grpcclient.InferInput("x", [1], "FP32")])
    except InferenceServerException as err:
        assert "Request for unknown model: 'nope' is not found" in err.message(), err.message()
    else:
        raise SystemExit("no error for an unknown model")
finally:
    server.stop()
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("first", ["tritonclient.grpc", "arachne_mlflow.protocol.grpc.inference_pb2"])
def test_tritonclient_and_our_messages_live_in_one_process(tmp_path, first):
    second = {"tritonclient.grpc", "arachne_mlflow.protocol.grpc.inference_pb2"} - {first}
    code = "import sys\n" + textwrap.dedent(_BOTH_IN_ONE_PROCESS).format(first=first, second=second.pop())
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.slow
def test_unknown_model_errors_carry_tritons_words_over_rest(grpc_server):
    response = requests.post(
        grpc_server.url + "/v2/models/nope/infer", json={"inputs": []}, headers=dict(AUTH), timeout=10
    )
    assert response.status_code == 404
    assert "Request for unknown model: 'nope' is not found" in response.json()["error"]
