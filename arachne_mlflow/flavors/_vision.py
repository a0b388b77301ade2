"""`save_model(labels=..., image_format=...)`: the `labels` and `image_formats` keys of MLmodel's
`arachne` block (model/vision.py), and the label files saved beside the model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.model.vision import MAX_LABEL_CHARS, MAX_LABELS, checked_image_formats, read_labels

#: What `labels` may be for one output: a text file (one label a line) or the labels in class order.
Labels = str | os.PathLike | list[str] | tuple[str, ...]


def image_formats_block(image_format: Any, inputs: list[TensorSpec]) -> dict[str, str]:
    """`image_format`: a layout ("NCHW", "NHWC") for the first input, or a mapping of input names to one."""
    if image_format is None:
        return {}
    if isinstance(image_format, str):
        image_format = {inputs[0].name: image_format} if inputs else {}
    return checked_image_formats(image_format, inputs, "image_format")


def write_labels(
    labels: Labels | dict[str, Labels] | None, outputs: list[TensorSpec], directory: Path
) -> dict[str, str]:
    """Save the labels as text files in the model `directory`; returns MLmodel's `labels` block.

    `labels` are for the first output, or a mapping of output names to labels; each output's go to
    `labels.txt` (the first output's) or `labels-<output index>.txt`.
    """
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        if not outputs:
            raise InvalidInputError("labels are for an output, and the model has none")
        labels = {outputs[0].name: labels}
    index = {spec.name: i for i, spec in enumerate(outputs)}
    block = {}
    for output, given in labels.items():
        if output not in index:
            raise InvalidInputError(f"labels name output {output!r}; the model's outputs are {list(index)}")
        name = "labels.txt" if index[output] == 0 else f"labels-{index[output]}.txt"
        (directory / name).write_text("".join(f"{label}\n" for label in _label_list(given, output)), "utf-8")
        block[output] = name
    return block


def _label_list(given: Labels, output: str) -> list[str]:
    """The labels of one output, checked against the bounds a server reads them within."""
    if isinstance(given, (str, os.PathLike)):
        if not Path(given).is_file():
            raise InvalidInputError(f"labels of output {output!r}: no file {os.fspath(given)!r}")
        return read_labels(Path(given))
    if not isinstance(given, (list, tuple)) or not all(isinstance(label, str) for label in given):
        raise InvalidInputError(f"labels of output {output!r} must be a file path or a list of strings")
    if len(given) > MAX_LABELS:
        raise InvalidInputError(f"labels of output {output!r}: more than {MAX_LABELS}")
    for label in given:
        if "\n" in label or "\r" in label or len(label) > MAX_LABEL_CHARS:
            raise InvalidInputError(
                f"labels of output {output!r}: {label[:40]!r} holds a line break or is longer than "
                f"{MAX_LABEL_CHARS} characters"
            )
    return list(given)
