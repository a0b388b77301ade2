"""Request bodies reach the app whole and in order however their bytes arrive: `server/http_limits.py`
keeps the pieces httptools parses instead of uvicorn's copies of them."""

from __future__ import annotations

import socket
import time

import httptools
import numpy as np
import pytest

from arachne_mlflow import runtime
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.protocol import codec
from arachne_mlflow.server.http_limits import BodyPieces
from tests.helpers import models
from tests.helpers.model_dirs import runtime_details, write_model_dir
from tests.helpers.servers import ServerProcess

pytestmark = pytest.mark.slow  # real server processes: `make test-fast` skips them

TOKEN = "body-token"


def test_body_pieces_are_handed_on_as_read_or_joined_in_order():
    one = BodyPieces()
    piece = b"a" * 100_000
    one += piece
    assert len(one) == 100_000 and bytes(one) is piece  # one piece: the object itself, no copy
    several = BodyPieces()
    for part in (b"ab", b"", b"cde", b"f"):
        several += part
    assert len(several) == 6 and bytes(several) == b"abcdef"
    assert bytes(BodyPieces()) == b""


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    root = tmp_path_factory.mktemp("body-model")
    onnx_file = root / "linear.onnx"
    onnx_file.write_bytes(models.onnx_linear("N").SerializeToString())
    model_dir = write_model_dir(root / "linear", "onnx", onnx_file, runtime_details("onnx", onnx_file))
    process = ServerProcess(tmp_path_factory.mktemp("body") / "store", token=TOKEN).start()
    with DeviceClient("127.0.0.1", process.port, token=TOKEN) as owner:
        owner.upload_model("linear", model_dir)
    with runtime.init("onnx", model_file=str(onnx_file)) as local:
        yield process, local
    process.stop()


def _infer_in_pieces(port: int, x: np.ndarray, piece: int, pause: float) -> tuple[int, bytes, dict]:
    """A binary infer request written `piece` bytes at a time with `pause` between; the answer."""
    body, header_length = codec.encode_request({"x": x})
    head = (
        f"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\n{codec.HEADER_LENGTH}: {header_length}\r\n\r\n"
    ).encode()
    answer: dict = {"body": [], "headers": {}, "done": False}

    class Collect:
        def on_header(self, name, value):
            answer["headers"][name.lower()] = value

        def on_body(self, data):
            answer["body"].append(data)

        def on_message_complete(self):
            answer["done"] = True

    parser = httptools.HttpResponseParser(Collect())
    request = head + body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for start in range(0, len(request), piece):
            sock.sendall(request[start : start + piece])
            time.sleep(pause)
        while not answer["done"]:
            parser.feed_data(sock.recv(65536))
    return parser.get_status_code(), b"".join(answer["body"]), answer["headers"]


@pytest.mark.parametrize(
    ("rows", "piece", "pause"),
    [
        (200_000, 1 << 30, 0.0),  # 3.2 MB written at once: the server reads it in several pieces
        (50_000, 64 * 1024, 0.005),  # 800 KB in pieces the app waits for, one at a time
        (300, 7, 0.0),  # 4.8 KB, the head and body cut every 7 bytes
    ],
)
def test_a_body_arriving_in_pieces_is_decoded_whole(linear, rows, piece, pause):
    process, local = linear
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    status, body, headers = _infer_in_pieces(process.port, x, piece, pause)
    assert status == 200, body[:300]
    response = codec.decode_response(body, headers.get(codec.HEADER_LENGTH.lower().encode()))
    np.testing.assert_array_equal(response["y"], local.infer([x])[0])
