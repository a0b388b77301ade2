"""Load an uploaded model in a child process before the server loads it.

Native code runs inside the server process: a TVM library whose constructor aborts, or a model
file that trips a bug in a DNN library, would take the whole server down. Loading it first in a
short-lived child turns such a crash into a refused upload. Ordinary load errors are left to the
in-process load, which reports them with their message.

    python -m arachne_mlflow.server.probe MODEL_DIR    # exit 0 loaded, 1 failed cleanly

A device that follows a registry also runs one inference in the child before it installs a new
version (`smoke_check`): with the model's input example where MLflow saved one, else random
inputs from the model's tensor specs. The child's last error line becomes the refusal's message.

    python -m arachne_mlflow.server.probe --smoke MODEL_DIR [EXAMPLE_JSON]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import InvalidInputError

PROBE_TIMEOUT = 300.0
MAX_EXAMPLE_BYTES = 16 * 1024**2
_MAX_MESSAGE = 1000


def probe_load(path: Path, name: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise `InvalidInputError` if loading the model at `path` crashes or hangs a process."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "arachne_mlflow.server.probe", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
    except subprocess.TimeoutExpired as err:
        raise InvalidInputError(f"model {name!r} did not load within {timeout:.0f} s; it was not installed") from err
    if result.returncode < 0:
        how = _signal_name(result.returncode)
        raise InvalidInputError(f"model {name!r} crashed the runtime while loading ({how}); it was not installed")


def smoke_check(path: Path, name: str, example: Path | None = None, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise `InvalidInputError` unless the model at `path` loads and answers one inference in a child process."""
    command = [sys.executable, "-m", "arachne_mlflow.server.probe", "--smoke", str(path)]
    if example is not None:
        command.append(str(example))
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
    except subprocess.TimeoutExpired as err:
        raise InvalidInputError(f"model {name!r} did not load and answer within {timeout:.0f} s") from err
    if result.returncode < 0:
        how = _signal_name(result.returncode)
        raise InvalidInputError(f"model {name!r} crashed the runtime in its smoke test ({how})")
    if result.returncode != 0:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines() or ["(no message)"]
        raise InvalidInputError(f"model {name!r} failed its smoke test: {lines[-1][:_MAX_MESSAGE]}")


def smoke_inputs(specs: list, example: Path | None) -> list:
    """One input per spec: from MLflow's saved input example when it fits the specs, else random."""
    import numpy as np

    from arachne_mlflow.runtime.base import random_tensor

    if example is not None and example.stat().st_size <= MAX_EXAMPLE_BYTES:
        try:
            data: Any = json.loads(example.read_text())
            if isinstance(data, dict) and "inputs" in data:  # (the serving form, `{"inputs": ...}`)
                data = data["inputs"]
            if isinstance(data, dict):
                values = [data[spec.name] for spec in specs]
            elif len(specs) == 1:
                values = [data]
            else:
                raise KeyError("one unnamed example for several inputs")
            return [spec.check(np.asarray(value, dtype=spec.dtype)) for spec, value in zip(specs, values)]
        except (ValueError, TypeError, KeyError, RecursionError):
            pass  # not an example of these tensors (a DataFrame's records...): random inputs below
    return [random_tensor(spec) for spec in specs]


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _main(argv: list[str]) -> int:
    from arachne_mlflow import runtime
    from arachne_mlflow.model.directory import read_model_dir

    smoke = argv[:1] == ["--smoke"]
    path = argv[1] if smoke else argv[0]
    try:
        module = runtime.load(read_model_dir(path))
    except Exception as err:  # noqa: BLE001 (reported by the parent: its own load, or this message)
        print(f"{type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    try:
        if smoke:
            outputs = module.infer(smoke_inputs(module.input_specs, Path(argv[2]) if len(argv) > 2 else None))
            if len(outputs) != len(module.output_specs):
                raise InvalidInputError(f"{len(outputs)} outputs, the model declares {len(module.output_specs)}")
    except Exception as err:  # noqa: BLE001 (any failure of the inference is the message)
        print(f"inference failed: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    finally:
        module.done()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
