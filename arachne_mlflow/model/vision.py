"""What vision clients read of a model: each image input's layout, and the class labels of its outputs.

Two optional keys of MLmodel's `arachne` block, both named by tensor:

    arachne:
      image_formats: {images: NCHW}        # input name -> NCHW or NHWC (a rank-4 input, or rank 3)
      labels: {probabilities: labels.txt}  # output name -> a text file in the model dir, one label a line

A server reports them in Triton's model configuration (`format: FORMAT_NCHW`, `label_filename`) and
answers Triton's classification requests (`class_count`) with "score:index:label" strings whose labels
come from the file. The file comes with an uploaded model, so it is read within bounds: at most
`MAX_LABELS_BYTES` of UTF-8, at most `MAX_LABELS` lines, each at most `MAX_LABEL_CHARS` long.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import InvalidInputError, ModelNotFoundError
from arachne_mlflow.model.spec import TensorSpec

#: The layouts an image input may declare (Triton's `FORMAT_NCHW`, `FORMAT_NHWC` without the prefix).
IMAGE_FORMATS = ("NCHW", "NHWC")
MAX_LABELS_BYTES = 1024 * 1024
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 1024


def checked_image_formats(value: Any, inputs: list[TensorSpec], where: str) -> dict[str, str]:
    """`image_formats` from MLmodel: a mapping of the signature's image inputs (rank 3 or 4) to a layout."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where}: 'image_formats' must map input names to one of {list(IMAGE_FORMATS)}")
    ranks = {spec.name: len(spec.shape) for spec in inputs}
    checked = {}
    for name, layout in value.items():
        if layout not in IMAGE_FORMATS:
            raise InvalidInputError(f"{where}: image_formats[{name!r}] is {layout!r}; use one of {list(IMAGE_FORMATS)}")
        if inputs and ranks.get(name) not in (3, 4):
            raise InvalidInputError(
                f"{where}: image_formats names {name!r}, which is not an image input (rank 3 or 4) of the "
                f"signature: {ranks}"
            )
        checked[str(name)] = layout
    return checked


def checked_label_files(value: Any, outputs: list[TensorSpec], where: str) -> dict[str, str]:
    """`labels` from MLmodel: a mapping of the signature's outputs to file names (checked by the caller)."""
    if value is None:
        return {}
    names = {spec.name for spec in outputs}
    if not isinstance(value, dict) or not all(isinstance(f, str) for f in value.values()):
        raise InvalidInputError(f"{where}: 'labels' must map output names to label files")
    unknown = sorted(str(name) for name in value if outputs and name not in names)
    if unknown:
        raise InvalidInputError(f"{where}: 'labels' names outputs {unknown}; the model's are {sorted(names)}")
    return {str(name): file for name, file in value.items()}


def read_labels(path: Path) -> list[str]:
    """The labels in a text file, one a line (a trailing empty line ignored), refused past the bounds."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_LABELS_BYTES + 1)
    except FileNotFoundError as err:
        raise ModelNotFoundError(f"labels file {path.name!r} named in MLmodel is missing") from err
    if len(raw) > MAX_LABELS_BYTES:
        raise InvalidInputError(f"labels file {path.name!r} is larger than {MAX_LABELS_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"labels file {path.name!r} is not UTF-8 text: {err}") from err
    labels = text.splitlines()
    if len(labels) > MAX_LABELS:
        raise InvalidInputError(f"labels file {path.name!r} has more than {MAX_LABELS} lines")
    for number, label in enumerate(labels, 1):
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidInputError(f"labels file {path.name!r}: line {number} is longer than {MAX_LABEL_CHARS}")
    return labels


@dataclass(frozen=True)
class VisionInfo:
    """A loaded model's image layouts and labels: what its configuration reports and classification uses."""

    image_formats: dict[str, str] = field(default_factory=dict)
    #: Output name -> the label file's name in the model dir (Triton's `label_filename`).
    label_files: dict[str, str] = field(default_factory=dict)
    #: Output name -> its labels, class index -> label.
    labels: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, model_dir: Path, image_formats: dict[str, str], label_files: dict[str, str]) -> VisionInfo:
        labels = {output: read_labels(model_dir / file) for output, file in label_files.items()}
        return cls(dict(image_formats), dict(label_files), labels)
