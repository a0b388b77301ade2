"""A smoke test in a child process: load a model and run one inference before a device switches to it.

A device that follows a registry (server/pull/follow.py) installs versions nobody checked on that
device. Before `ModelStore.put` swaps one in, a short-lived child loads it and runs one inference
under the smoke policy the push side's health gate applies too (model/smoke_policy.py: MLflow's
saved input example where it fits, else generated inputs; the outputs checked against the
signature): a model that loads but cannot answer, answers outside its signature, or crashes the
library while answering, is refused while the old version keeps serving. The child's last error
line becomes the refusal's message.

    python -m arachne_mlflow.server.pull.smoke MODEL_DIR [EXAMPLE_JSON]    # exit 0 answered, 1 failed
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model import smoke_policy
from arachne_mlflow.model.smoke_policy import MAX_EXAMPLE_BYTES  # noqa: F401 (follow.py bounds its download with it)
from arachne_mlflow.server.probe import PROBE_TIMEOUT, child_env, die_with_parent

_MAX_MESSAGE = 1000


def smoke_check(path: Path, name: str, example: Path | None = None, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise `InvalidInputError` unless the model at `path` loads and answers one inference in a child process."""
    command = [sys.executable, "-m", "arachne_mlflow.server.pull.smoke", str(path)]
    if example is not None:
        command.append(str(example))
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            env=child_env(),  # (the child dies with the server: `die_with_parent`)
        )
    except subprocess.TimeoutExpired as err:
        raise InvalidInputError(f"model {name!r} did not load and answer within {timeout:.0f} s") from err
    if result.returncode < 0:
        try:
            how = signal.Signals(-result.returncode).name
        except ValueError:
            how = f"signal {-result.returncode}"
        raise InvalidInputError(f"model {name!r} crashed the runtime in its smoke test ({how})")
    if result.returncode != 0:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines() or ["(no message)"]
        raise InvalidInputError(f"model {name!r} failed its smoke test: {lines[-1][:_MAX_MESSAGE]}")


def smoke_inputs(specs: list, example: Path | None) -> list:
    """One input per spec, by the smoke policy, from the example file at `example` (if any)."""
    return smoke_policy.smoke_inputs(specs, smoke_policy.load_example(example) if example is not None else None)


def run_smoke(module, model, example: Path | None = None) -> None:
    """One inference of the loaded `module` of `model` by the smoke policy; `InvalidInputError` if its
    answer is not the signature's (MLmodel's outputs, else the module's)."""
    example = example if example is not None else smoke_policy.example_path(model)
    outputs = module.infer(smoke_inputs(module.input_specs, example))
    if len(outputs) != len(module.output_specs):
        raise InvalidInputError(f"{len(outputs)} outputs, the model declares {len(module.output_specs)}")
    named = {spec.name: value for spec, value in zip(module.output_specs, outputs)}
    smoke_policy.check_outputs(named, model.outputs or module.output_specs)


def _main(argv: list[str]) -> int:
    die_with_parent()
    from arachne_mlflow import runtime
    from arachne_mlflow.model.directory import read_model_dir

    try:
        model = read_model_dir(argv[0])
        module = runtime.load(model)
    except Exception as err:  # noqa: BLE001 (any failure to load is the message)
        print(f"{type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    try:
        run_smoke(module, model, Path(argv[1]) if len(argv) > 1 else None)
    except Exception as err:  # noqa: BLE001 (any failure of the inference is the message)
        print(f"inference failed: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    finally:
        module.done()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
