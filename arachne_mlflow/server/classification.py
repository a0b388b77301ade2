"""The serving side of what vision clients use: Triton's classification extension on a loaded model's
outputs, and its image formats and label files in the model configuration (model/vision.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError, ModelNotReadyError
from arachne_mlflow.protocol import codec
from arachne_mlflow.protocol.classification import top_classes
from arachne_mlflow.server.loading import LoadedModel
from arachne_mlflow.server.store import ModelStore


def answer_outputs(loaded: LoadedModel, answer: dict[str, np.ndarray], request: codec.InferRequest) -> dict[str, Any]:
    """The model's outputs by name (`answer`, left as it is), those the request asked as classes
    replaced by their top classes."""
    if not request.classes:
        return answer
    results = dict(answer)
    for name, count in request.classes.items():
        if name not in results:
            raise InvalidInputError(f"the model has no output {name!r}; outputs: {loaded.output_names}")
        labels = loaded.vision.labels.get(name, ())
        results[name] = top_classes(np.asarray(results[name]), count, labels, loaded.batching is not None, name)
    return results


def add_to_config(config: dict[str, Any], store: ModelStore, name: str) -> dict[str, Any]:
    """Triton's model configuration with each image input's `format` and each labelled output's
    `label_filename` (a loaded model's: an unloaded one's configuration has neither)."""
    try:
        loaded = store.get(name)
    except ModelNotReadyError:
        return config
    for tensor in config["input"]:
        if layout := loaded.vision.image_formats.get(tensor["name"]):
            tensor["format"] = f"FORMAT_{layout}"
    for tensor in config["output"]:
        if file := loaded.vision.label_files.get(tensor["name"]):
            tensor["label_filename"] = file
    return config
