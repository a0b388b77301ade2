"""How far a variant's outputs are from the reference variant's, on one input example.

Two figures: the largest absolute difference over every output element, and, for outputs shaped
like a classifier's scores (`[rows, classes]`, float), the fraction of rows whose top-1 class is
the same. A variant is within its tolerance when every element satisfies
`|output - reference| <= atol + rtol * |reference|` and its top-1 agreement is at least `top1`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.runtime.base import random_tensor

#: Float builds of one network differ by rounding; a quantized build declares a wider tolerance.
DEFAULT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3, "top1": 1.0}


def example_inputs(example: Any, specs: list[TensorSpec]) -> tuple[list[np.ndarray], str]:
    """The model's inputs, in order, from an input example (an ndarray for a single input, or a
    dict name -> array); generated from the specs when there is none. Also says which it was."""
    if example is None:
        return [random_tensor(spec) for spec in specs], "generated"
    if isinstance(example, Mapping):
        missing = [spec.name for spec in specs if spec.name not in example]
        if missing:
            raise InvalidInputError(
                f"the input example lacks inputs {missing}: the model takes {[s.name for s in specs]}"
            )
        values = [example[spec.name] for spec in specs]
    elif len(specs) == 1:
        values = [example]
    else:
        raise InvalidInputError(
            f"the input example of a model with inputs {[s.name for s in specs]} is a dict name -> array"
        )
    try:
        return [np.asarray(v, dtype=spec.dtype) for v, spec in zip(values, specs)], "input_example"
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"the input example does not convert to the model's input dtypes: {err}") from err


def compare_outputs(
    reference: list[np.ndarray], outputs: list[np.ndarray], tolerance: Mapping[str, float]
) -> dict[str, Any]:
    """`max_abs_diff`, `top1_agreement` (when an output is classifier-shaped), `within_tolerance`, `summary`."""
    if len(outputs) != len(reference) or any(o.shape != r.shape for o, r in zip(outputs, reference)):
        shapes = [list(o.shape) for o in outputs], [list(r.shape) for r in reference]
        return {"within_tolerance": False, "summary": f"output shapes {shapes[0]}, the reference's {shapes[1]}"}
    max_abs, excess = 0.0, 0.0
    for out, ref in zip(outputs, reference):
        if out.size == 0:
            continue
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        max_abs = max(max_abs, float(diff.max()))
        excess = max(excess, float((diff - tolerance["rtol"] * np.abs(ref.astype(np.float64))).max()))
    figures: dict[str, Any] = {"max_abs_diff": max_abs}
    agreement = _top1_agreement(reference, outputs)
    within = excess <= tolerance["atol"]
    summary = f"max abs difference {max_abs:.4g}"
    if agreement is not None:
        figures["top1_agreement"] = agreement
        within = within and agreement >= tolerance["top1"]
        summary += f", top-1 agreement {agreement:.3f}"
    return {**figures, "within_tolerance": within, "summary": summary}


def _top1_agreement(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float | None:
    """The lowest fraction of rows with the same argmax, over the classifier-shaped outputs (None: none is)."""
    fractions = [
        float(np.mean(np.argmax(out, axis=1) == np.argmax(ref, axis=1)))
        for out, ref in zip(outputs, reference)
        if ref.ndim == 2 and ref.shape[0] > 0 and ref.shape[1] > 1 and ref.dtype.kind == "f"
    ]
    return min(fractions) if fractions else None
