"""Models for vision clients: labels and image formats saved by the flavors, reported in Triton's model
configuration, and Triton's classification extension (`class_count`) answered by a server on loopback to
the real tritonclient over HTTP and gRPC, the way Triton's image client asks and reads it."""

from __future__ import annotations

import queue
import types
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as mc
import tritonclient.http as httpclient
import yaml
from PIL import Image
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.flavors import onnx as onnx_flavor
from arachne_mlflow.model import vision
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.protocol.classification import top_classes
from tests.helpers import models
from tests.helpers.servers import ThreadServer
from tests.helpers.vision import LABELS, MAX_BATCH_SIZE, expected_top, onnx_image_classifier, save_image_classifier

CLASSES = 3


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return save_image_classifier(tmp_path_factory.mktemp("vision"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, classifier_dir):
    root = tmp_path_factory.mktemp("classification")
    onnx_flavor.save_model(models.onnx_linear(1), root / "linear")  # no labels, no batch
    running = ThreadServer(root / "store").start()
    yield running.deploy({"classifier": classifier_dir, "linear": root / "linear"})
    running.stop()


@pytest.fixture
def image_files(tmp_path):
    """Two small RGB pictures of other sizes than the model's (the client resizes them)."""
    rng = np.random.default_rng(3)
    paths = []
    for i, size in enumerate(((20, 12), (9, 16))):
        path = tmp_path / f"image-{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


# -- saving: MLmodel's keys ----------------------------------------------------------------------
def test_labels_and_image_format_are_saved_with_the_model(classifier_dir):
    block = yaml.safe_load((classifier_dir / "MLmodel").read_text())["flavors"]["arachne"]
    assert block["labels"] == {"probabilities": "labels.txt"}
    assert block["image_formats"] == {"images": "NCHW"}
    assert (classifier_dir / "labels.txt").read_text().splitlines() == LABELS
    model = read_model_dir(classifier_dir)
    assert model.image_formats == {"images": "NCHW"} and model.label_files == {"probabilities": "labels.txt"}
    assert "labels.txt" in model.files()  # it travels with the model to devices


def test_labels_as_a_list_or_per_output(tmp_path):
    onnx_flavor.save_model(models.onnx_linear(1), tmp_path / "list", labels=["a", "b", "c"])
    assert (tmp_path / "list" / "labels.txt").read_text() == "a\nb\nc\n"
    onnx_flavor.save_model(models.onnx_two_in_two_out(), tmp_path / "two", labels={"scaled": ["x"]})
    model = read_model_dir(tmp_path / "two")
    assert model.label_files == {"scaled": f"labels-{[s.name for s in model.outputs].index('scaled')}.txt"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": ["a\nb"]}, "line break"),
        ({"labels": {"nope": ["a"]}}, "labels name output 'nope'"),
        ({"labels": "/no/such/labels.txt"}, "no file"),
        ({"labels": [1, 2]}, "list of strings"),
        ({"image_format": "CHWN"}, "use one of"),
        ({"image_format": "NCHW"}, "not an image input"),  # x is [1, 4]
    ],
)
def test_bad_labels_or_formats_are_refused_and_leave_nothing(tmp_path, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        onnx_flavor.save_model(models.onnx_linear(1), tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


def test_labels_file_is_read_within_bounds(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("x\n" * (vision.MAX_LABELS + 1))
    with pytest.raises(InvalidInputError, match="more than"):
        vision.read_labels(path)
    path.write_bytes(b"a" * (vision.MAX_LABELS_BYTES + 1))
    with pytest.raises(InvalidInputError, match="larger than"):
        vision.read_labels(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        vision.read_labels(path)


def test_a_model_whose_labels_file_is_too_large_is_refused_at_upload(server, classifier_dir, tmp_path):
    import shutil

    from arachne_mlflow.client import DeviceClient

    bad = tmp_path / "bad"
    shutil.copytree(classifier_dir, bad)
    (bad / "labels.txt").write_bytes(b"x\n" * (vision.MAX_LABELS + 1))
    with DeviceClient("127.0.0.1", server.port) as device, pytest.raises(InvalidInputError, match="more than"):
        device.upload_model("bad_labels", bad)
    assert "bad_labels" not in {entry["name"] for entry in device_index(server)}


def device_index(server):
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        return client.get_model_repository_index()


# -- the top classes -----------------------------------------------------------------------------
def test_top_classes_of_a_batch_and_of_a_whole_output():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    batched = top_classes(scores, 2, ["a", "b"], batched=True, output="p")
    assert batched.shape == (2, 2)
    assert batched.tolist() == [[b"0.700000:1:b", b"0.200000:2"], [b"0.500000:0:a", b"0.250000:1:b"]]
    whole = top_classes(scores, 10, [], batched=False, output="p")  # every value, one list; count capped
    assert whole.shape == (6,) and whole[0] == b"0.700000:1"
    with pytest.raises(InvalidInputError, match="needs numbers"):
        top_classes(np.array([b"x"], dtype=object), 1, [], batched=False, output="p")
    with pytest.raises(InvalidInputError, match="more than"):  # every class of a large output: bounded
        top_classes(np.zeros((11, 100_000), np.float32), 100_000, [], batched=True, output="p")


# -- Triton's image client, over HTTP and gRPC -----------------------------------------------------
def _attributes(value):
    """JSON as attributes, as the image client's AttrDict makes it of the HTTP answers."""
    if isinstance(value, dict):
        return types.SimpleNamespace(**{key: _attributes(item) for key, item in value.items()})
    if isinstance(value, list):
        return [_attributes(item) for item in value]
    return value


def parse_model(model_metadata, model_config):
    """image_client.py's parse_model: the checks it makes of an image classification network."""
    if len(model_metadata.inputs) != 1 or len(model_metadata.outputs) != 1 or len(model_config.input) != 1:
        raise AssertionError("expecting 1 input and 1 output")
    input_metadata, input_config = model_metadata.inputs[0], model_config.input[0]
    output_metadata = model_metadata.outputs[0]
    assert output_metadata.datatype == "FP32"
    output_batch_dim = model_config.max_batch_size > 0
    non_one = [dim for i, dim in enumerate(output_metadata.shape) if not (i == 0 and output_batch_dim) and dim > 1]
    assert len(non_one) <= 1, "expecting model output to be a vector"
    input_batch_dim = model_config.max_batch_size > 0
    assert len(input_metadata.shape) == 3 + (1 if input_batch_dim else 0)
    fmt = input_config.format
    if isinstance(fmt, str):
        fmt = dict(mc.ModelInput.Format.items())[fmt]
    assert fmt in (mc.ModelInput.FORMAT_NCHW, mc.ModelInput.FORMAT_NHWC)
    offset = 1 if input_batch_dim else 0
    if fmt == mc.ModelInput.FORMAT_NHWC:
        h, w, c = input_metadata.shape[offset : offset + 3]
    else:
        c, h, w = input_metadata.shape[offset : offset + 3]
    return model_config.max_batch_size, input_metadata.name, output_metadata.name, c, h, w, fmt, input_metadata.datatype


def preprocess(img, fmt, dtype, c, h, w):
    """image_client.py's preprocess, scaling NONE."""
    sample = img.convert("L") if c == 1 else img.convert("RGB")
    resized = np.array(sample.resize((w, h), Image.BILINEAR))
    if resized.ndim == 2:
        resized = resized[:, :, np.newaxis]
    typed = resized.astype(triton_to_np_dtype(dtype))
    return np.transpose(typed, (2, 0, 1)) if fmt == mc.ModelInput.FORMAT_NCHW else typed


def postprocess(output_array, batch_size, supports_batching):
    """image_client.py's postprocess: (score, index, label) of each result of each image."""
    assert not supports_batching or len(output_array) == batch_size
    rows = []
    for results in output_array:
        if not supports_batching:
            results = [results]
        row = []
        for result in results:
            cls = "".join(chr(x) for x in result).split(":") if output_array.dtype.type == np.object_ else result
            row.append((float(cls[0]), int(cls[1]), cls[2]))
        rows.append(row)
    return rows


def run_image_client(protocol, server, image_files, batch_size=2):
    """What image_client.py does with `-i <protocol> -m classifier -c 3 -b <batch_size> <dir>` (and
    `--streaming` for "grpc-stream")."""
    streaming = protocol == "grpc-stream"
    protocol = "grpc" if streaming else protocol
    client_module = grpcclient if protocol == "grpc" else httpclient
    url = f"127.0.0.1:{server.grpc_port if protocol == 'grpc' else server.port}"
    client = client_module.InferenceServerClient(url=url)
    metadata = client.get_model_metadata(model_name="classifier", model_version="")
    config = client.get_model_config(model_name="classifier", model_version="")
    if protocol == "grpc":
        config = config.config
    else:
        metadata, config = _attributes(metadata), _attributes(config)
    max_batch_size, input_name, output_name, c, h, w, fmt, dtype = parse_model(metadata, config)
    assert max_batch_size > 0
    images = [preprocess(Image.open(path), fmt, dtype, c, h, w) for path in sorted(image_files)]
    batch = np.stack(images[:batch_size], axis=0)
    inputs = [client_module.InferInput(input_name, batch.shape, dtype)]
    inputs[0].set_data_from_numpy(batch)
    outputs = [client_module.InferRequestedOutput(output_name, class_count=CLASSES)]
    if streaming:
        completed = queue.Queue()
        client.start_stream(partial(lambda user_data, result, error: user_data.put((result, error)), completed))
        client.async_stream_infer("classifier", inputs, request_id="1", model_version="", outputs=outputs)
        result, error = completed.get(timeout=60)
        assert error is None and result.get_response().id == "1"
        client.stop_stream()
    else:
        result = client.infer("classifier", inputs, request_id="1", model_version="", outputs=outputs)
    client.close()
    return batch, postprocess(result.as_numpy(output_name), batch_size, max_batch_size > 0)


@pytest.mark.parametrize("protocol", ["http", "grpc", "grpc-stream"])
def test_triton_image_client_classifies(server, image_files, protocol):
    batch, rows = run_image_client(protocol, server, image_files)
    expected = expected_top(batch, CLASSES)
    assert len(rows) == 2
    for got, want in zip(rows, expected):
        assert [(index, label) for _, index, label in got] == [(index, label) for _, index, label in want]
        np.testing.assert_allclose([score for score, _, _ in got], [score for score, _, _ in want], atol=1e-5)
    assert rows[0] != rows[1]  # two pictures, two answers


def test_model_configuration_reports_format_and_labels(server):
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        config = client.get_model_config("classifier")
    assert config["max_batch_size"] == MAX_BATCH_SIZE
    assert config["input"] == [{"name": "images", "data_type": "TYPE_FP32", "dims": [3, 8, 8], "format": "FORMAT_NCHW"}]
    assert config["output"][0]["label_filename"] == "labels.txt"
    grpc_config = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}").get_model_config("classifier")
    assert grpc_config.config.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert grpc_config.config.output[0].label_filename == "labels.txt"
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        linear = client.get_model_config("linear")
    assert "format" not in linear["input"][0] and "label_filename" not in linear["output"][0]


def test_classes_without_labels_or_batch(server):
    """A model with no labels answers "score:index"; one that does not batch, over its whole output."""
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        tensor = httpclient.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        plain = client.infer("linear", [tensor]).as_numpy("y")[0]
        for binary in (True, False):
            out = httpclient.InferRequestedOutput("y", binary_data=binary, class_count=2)
            answer = client.infer("linear", [tensor], outputs=[out]).as_numpy("y")
            texts = [item.decode() if isinstance(item, bytes) else item for item in answer]  # (JSON: str)
            order = np.argsort(-plain, kind="stable")[:2]
            assert answer.shape == (2,) and texts == [f"{plain[i]:f}:{i}" for i in order]


@pytest.mark.parametrize("count", [0, -1, 100_001])
def test_a_bad_class_count_is_refused(server, count):
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "y", "parameters": {"classification": count}}],
    }
    import requests

    response = requests.post(f"{server.url}/v2/models/linear/infer", json=body, timeout=10)
    assert response.status_code == 400 and "positive integer" in response.json()["error"]
    tensor = grpcclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    out = grpcclient.InferRequestedOutput("y")
    out._output.parameters["classification"].int64_param = count
    with pytest.raises(InferenceServerException, match="positive integer") as caught:
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}").infer("linear", [tensor], outputs=[out])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_variants_share_the_models_labels_and_image_format(tmp_path):
    from arachne_mlflow.flavors import variants

    model = onnx_image_classifier()
    builds = {"onnx": variants.Variant("onnx", model), "again": variants.Variant("onnx", model)}
    variants.save_model(builds, tmp_path / "v", labels=LABELS, image_format="NCHW")
    for name in ("onnx", "again"):
        view = read_model_dir(tmp_path / "v", variant=name)
        assert view.label_files == {"probabilities": "labels.txt"} and view.image_formats == {"images": "NCHW"}
        assert "labels.txt" in view.files()
