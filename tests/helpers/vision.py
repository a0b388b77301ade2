"""A tiny image classifier saved the way vision users save theirs: labels, the input's layout, batching.

images[N, 3, 8, 8] (NCHW, float32) -> probabilities[N, 5]: one 8x8 convolution per class, then a
softmax, with random weights (every image gets its own scores, so a test can check the order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.models import RNG_SEED, _onnx_model

LABELS = ["cat", "dog", "bird", "fish", "frog"]
INPUT, OUTPUT = "images", "probabilities"
CHANNELS, SIZE = 3, 8
MAX_BATCH_SIZE = 8


def onnx_image_classifier():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(RNG_SEED)
    weights = rng.standard_normal((len(LABELS), CHANNELS, SIZE, SIZE)).astype(np.float32) / SIZE
    graph = helper.make_graph(
        [
            helper.make_node("Conv", [INPUT, "W"], ["scores"]),  # [N, 5, 1, 1]
            helper.make_node("Flatten", ["scores"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [OUTPUT], axis=1),
        ],
        "image_classifier",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", len(LABELS)])],
        [numpy_helper.from_array(weights, "W")],
    )
    return _onnx_model(graph)


def save_image_classifier(directory: Path) -> Path:
    """The classifier as an MLflow model dir with its labels (from a text file) and its image format."""
    from arachne_mlflow.flavors import onnx as onnx_flavor

    directory.mkdir(parents=True, exist_ok=True)
    labels_file = directory / "source-labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n")
    path = directory / "image_classifier"
    onnx_flavor.save_model(
        onnx_image_classifier(),
        path,
        labels=labels_file,
        image_format="NCHW",
        batching={"max_batch_size": MAX_BATCH_SIZE},
    )
    return path


def expected_top(images: np.ndarray, count: int) -> list[list[tuple[float, int, str]]]:
    """The classifier's top `count` classes of each image, computed here with onnxruntime."""
    import onnxruntime

    model = onnx_image_classifier().SerializeToString()
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {INPUT: images})
    tops = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")[:count]
        tops.append([(float(row[i]), int(i), LABELS[i]) for i in order])
    return tops
