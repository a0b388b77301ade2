"""Load models in short-lived child processes before the server loads them.

Native code runs inside the server process: a TVM library whose constructor aborts, a delegate or
driver that segfaults, a model file that trips a bug in a DNN library would take the whole server
down. Loading each model first in a child turns such a crash into a refused upload, or at start-up
into a quarantined model, while the server stays up.

    python -m arachne_mlflow.server.probe [--smoke] MODEL_DIR...    # one JSON report per model on stdout

With `--smoke` (an upload's probe) the child also runs each model's smoke inference, by the smoke
policy the health gate and pull mode apply (server/pull/smoke.py `run_smoke`): a model that loads but
cannot answer, or answers outside its signature, is refused before it replaces anything.

The child loads each model in turn, frees it, and reports success or the error's type and message,
so the server neither loads a model that fails nor imports its library to say why. A child that
dies, or hangs past the timeout, is blamed on the model it was loading (on its own in a fresh child
if it was not the child's first), and the models after it are probed again in a fresh child. A
child that imported TVM also reports which TVM devices exist: `GET /v2` lists them from there, so
the serving process never imports TVM to answer it (a server whose start-up probed no TVM model has
a child list them in the background: `python -m arachne_mlflow.server.probe` with no model).

A child dies with its server: its first act is to ask Linux for SIGKILL when the server's thread
that started it ends (`die_with_parent`, also used by smoke.py), so a server killed with SIGKILL
leaves no child behind. A probe given a `stop` event (the store's, set when the server stops) is
killed within a fraction of a second of it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from arachne_mlflow import errors
from arachne_mlflow.errors import ArachneError, InvalidInputError
from arachne_mlflow.model.directory import ArachneModel

_logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 300.0
# Children at once when several runtimes' models are probed (start-up); each holds one library.
PROBE_WORKERS = max(1, min(4, os.cpu_count() or 1))
# TVM device kinds a model may name (MLmodel `arachne.tvm.device`).
TVM_DEVICE_KINDS = ("cpu", "cuda", "rocm", "opencl", "vulkan", "metal")
_TRAILING_SECONDS = 30.0  # for the device report after the last model's
_STOP_POLL_SECONDS = 0.2  # how often a waiting probe looks at its stop event
PARENT_ENV = "ARACHNE_PARENT_PID"  # the server's process id, for the child's `die_with_parent`
_PR_SET_PDEATHSIG = 1
_known_tvm_devices: tuple[str, ...] | None = None


_listing: threading.Thread | None = None


def list_tvm_devices_in_background() -> None:
    """Have a child list TVM's devices, unless one has or TVM is not installed (nothing waits for it)."""
    global _listing
    if _known_tvm_devices is not None or importlib.util.find_spec("tvm") is None:
        return
    _listing = threading.Thread(target=_run_child, args=([], PROBE_TIMEOUT), name="arachne-tvm-devices", daemon=True)
    _listing.start()


def known_tvm_devices(wait: float = PROBE_TIMEOUT) -> tuple[str, ...] | None:
    """The TVM devices the last child that imported TVM found (waiting for a listing under way);
    None when no child has."""
    listing = _listing
    if listing is not None:
        listing.join(wait)
    return _known_tvm_devices


def probe_load(
    model: ArachneModel,
    name: str,
    consequence: str = "it was not installed",
    timeout: float = PROBE_TIMEOUT,
    stop: threading.Event | None = None,
    smoke: bool = False,
) -> None:
    """Raise the error loading `model` (and, `smoke`, its smoke inference) gives in a child
    (`InvalidInputError` if it crashes or hangs one)."""
    error = probe_many({name: model}, consequence, timeout, stop, smoke)[name]
    if error is not None:
        raise error


def probe_many(
    models: Mapping[str, ArachneModel],
    consequence: str,
    timeout: float = PROBE_TIMEOUT,
    stop: threading.Event | None = None,
    smoke: bool = False,
) -> dict[str, ArachneError | None]:
    """Probe every model (by name), one child per runtime, `PROBE_WORKERS` at a time; None means it loads.

    Once `stop` is set, the children are killed and the models not yet probed fail.
    """
    groups: dict[str, list[tuple[str, Path]]] = {}
    for name, model in models.items():
        groups.setdefault(model.runtime, []).append((name, model.path))
    results: dict[str, ArachneError | None] = {}
    with ThreadPoolExecutor(max(1, min(PROBE_WORKERS, len(groups)))) as pool:
        for found in pool.map(lambda group: _probe_group(group, consequence, timeout, stop, smoke), groups.values()):
            results.update(found)
    return results


def _probe_group(
    group: list[tuple[str, Path]], consequence: str, timeout: float, stop: threading.Event | None, smoke: bool
) -> dict[str, ArachneError | None]:
    results: dict[str, ArachneError | None] = {}
    pending = list(group)
    while pending:
        if stop is not None and stop.is_set():
            for name, _ in pending:
                results[name] = InvalidInputError(f"model {name!r} was not loaded: the server is stopping")
            break
        reports, failure, hung = _run_child([path for _, path in pending], timeout, stop, smoke)
        for (name, _), report in zip(pending, reports):
            results[name] = _error(name, report)
        pending = pending[len(reports) :]
        # A crash of the child's first model, or a hang, is that model's doing; a crash after other
        # models loaded in the same child is checked again with the model first in a fresh child.
        if pending and (hung or not reports):
            name, _ = pending.pop(0)
            results[name] = InvalidInputError(f"model {name!r} {failure}; {consequence}")
    return results


def child_env() -> dict[str, str]:
    """The environment of a probe or smoke child: quiet libraries, TVM's runtime only, the server's pid."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", PARENT_ENV: str(os.getpid())}
    env.setdefault("TVM_USE_RUNTIME_LIB", "1")  # a child only loads and runs: TVM's compiler library is not needed
    return env


def die_with_parent() -> None:
    """In a child: be killed when the server that started it dies (Linux), and exit now if it already has."""
    parent = os.environ.get(PARENT_ENV)
    if not sys.platform.startswith("linux") or not parent:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        _logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if str(os.getppid()) != parent:  # the server died before the request above
        os._exit(1)


def _run_child(
    paths: list[Path], timeout: float, stop: threading.Event | None = None, smoke: bool = False
) -> tuple[list[dict], str, bool]:
    """Reports of a child that probes `paths`; why it stopped early (empty when it did not); whether it hung."""
    command = [sys.executable, "-m", "arachne_mlflow.server.probe", *(["--smoke"] if smoke else []), *map(str, paths)]
    reports: list[dict] = []
    failure, hung = "", False
    with tempfile.TemporaryFile() as stderr:
        pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": stderr}
        with subprocess.Popen(command, env=child_env(), **pipes) as child:
            out, pending = child.stdout.fileno(), b""
            while True:
                waiting = timeout if len(reports) < len(paths) else _TRAILING_SECONDS
                if not _readable(out, waiting, stop):
                    child.kill()
                    hung = len(reports) < len(paths) and not (stop is not None and stop.is_set())
                    break
                chunk = os.read(out, 1 << 16)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    _take(line, reports)
            returncode = child.wait()
        if hung:
            failure = f"did not load within {timeout:.0f} s"
        elif stop is not None and stop.is_set():
            failure = "was not loaded: the server is stopping"
        elif len(reports) < len(paths):
            failure = f"crashed the runtime while loading ({_how(returncode)})"
        if failure:
            stderr.seek(0, os.SEEK_END)
            stderr.seek(max(0, stderr.tell() - 2000))
            tail = stderr.read().decode("utf-8", "replace").strip()
            _logger.warning("loading %s %s; its output ended with: %s", paths[len(reports)], failure, tail or "-")
    return reports, failure, hung


def _readable(descriptor: int, seconds: float, stop: threading.Event | None) -> bool:
    """Wait until `descriptor` is readable (True), `seconds` pass or `stop` is set (False)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if stop is not None and stop.is_set():
            return False
        if select.select([descriptor], [], [], min(left, _STOP_POLL_SECONDS))[0]:
            return True
    return False


def _take(line: bytes, reports: list[dict]) -> None:
    global _known_tvm_devices
    try:
        message = json.loads(line)
    except ValueError:
        return
    if "tvm_devices" in message:
        _known_tvm_devices = tuple(message["tvm_devices"])
    else:
        reports.append(message)


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _error(name: str, report: dict) -> ArachneError | None:
    """The error a child reported, as the same `ArachneError` class (None when the model loaded)."""
    if report.get("ok"):
        return None
    if report.get("smoke"):
        return InvalidInputError(f"model {name!r} loads but failed its smoke inference: {report.get('message', '')}")
    cls = getattr(errors, str(report.get("error")), None)
    if isinstance(cls, type) and issubclass(cls, ArachneError):
        return cls(report.get("message", ""))
    # a DNN library's own error for a corrupt or foreign model file
    return InvalidInputError(f"model {name!r} cannot be loaded: {report.get('message', '')}")


def _main(paths: list[str]) -> None:
    die_with_parent()
    smoke = paths[:1] == ["--smoke"]
    paths = paths[1:] if smoke else paths
    reports = os.dup(1)
    os.dup2(2, 1)  # what libraries print goes to stderr, not into the reports
    from arachne_mlflow import runtime
    from arachne_mlflow.model.directory import read_model_dir

    if not paths:  # asked for TVM's devices only
        from arachne_mlflow.runtime.tvm import import_tvm

        import_tvm()
    devices_sent = False
    for path in paths:
        try:
            model = read_model_dir(path)
            module = runtime.load(model)
            report = _smoke_report(module, model) if smoke else {"ok": True}
            module.done()
        except ArachneError as err:
            report = {"ok": False, "error": type(err).__name__, "message": str(err)}
        except Exception as err:  # noqa: BLE001 (reported to the server, which names the model)
            report = {"ok": False, "error": None, "message": f"{type(err).__name__}: {err}"}
        _send(reports, report)
        if not devices_sent and "tvm" in sys.modules:
            _send(reports, {"tvm_devices": _tvm_devices_here()})
            devices_sent = True
    if not devices_sent and "tvm" in sys.modules:
        _send(reports, {"tvm_devices": _tvm_devices_here()})
    os._exit(0)  # skip the libraries' teardown: it may hang or crash once every report is out


def _smoke_report(module, model) -> dict:
    """The report of `module`'s smoke inference (in a child, after it loaded)."""
    from arachne_mlflow.server.pull.smoke import run_smoke

    try:
        run_smoke(module, model)
    except Exception as err:  # noqa: BLE001 (reported to the server, which names the model)
        return {"ok": False, "smoke": True, "message": f"{type(err).__name__}: {' '.join(str(err).split())}"[:1000]}
    return {"ok": True}


def _send(descriptor: int, message: dict) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(descriptor, data) :]


def _tvm_devices_here() -> list[str]:
    tvm = sys.modules["tvm"]
    found = []
    for kind in TVM_DEVICE_KINDS:
        try:
            if tvm.runtime.device(kind).exist:
                found.append(kind)
        except Exception:  # noqa: BLE001 (a device kind this TVM build does not know)
            continue
    return found


if __name__ == "__main__":
    _main(sys.argv[1:])
