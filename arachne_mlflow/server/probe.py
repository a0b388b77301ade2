"""Load an uploaded model in a child process before the server loads it.

Native code runs inside the server process: a TVM library whose constructor aborts, or a model
file that trips a bug in a DNN library, would take the whole server down. Loading it first in a
short-lived child turns such a crash into a refused upload. Ordinary load errors are left to the
in-process load, which reports them with their message.

    python -m arachne_mlflow.server.probe MODEL_DIR    # exit 0 loaded, 1 failed cleanly
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from arachne_mlflow.errors import InvalidInputError

PROBE_TIMEOUT = 300.0


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
        try:
            how = signal.Signals(-result.returncode).name
        except ValueError:
            how = f"signal {-result.returncode}"
        raise InvalidInputError(f"model {name!r} crashed the runtime while loading ({how}); it was not installed")


def _main(path: str) -> int:
    from arachne_mlflow import runtime
    from arachne_mlflow.model.directory import read_model_dir

    try:
        runtime.load(read_model_dir(path)).done()
    except Exception:  # noqa: BLE001 (the parent's own load reports it; only crashes matter here)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
