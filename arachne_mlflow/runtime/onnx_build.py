"""Which onnxruntime build this machine has and its execution providers, without loading it here.

Several distributions install the same `onnxruntime` module: PyPI's CPU `onnxruntime`, NVIDIA's
`onnxruntime-gpu` builds for Jetson, and others. A device that brings its own build must not also
have another: they overwrite each other's files. The device server reports the build Python
imports, its providers and such a conflict in `GET /v2`. Importing onnxruntime costs the server
tens of MB, so unless it is loaded already (an ONNX model is), a short-lived child asks it, once.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

PROVIDERS_TIMEOUT = 60.0
_ASK_PROVIDERS = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"


@functools.lru_cache(maxsize=1)
def onnxruntime_build() -> dict[str, Any] | None:
    """`{"library", "version", "providers"}` of the onnxruntime Python imports (None: there is none),
    with `"conflict"` when several distributions install it and `"error"` when it cannot be imported."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    installed = _distributions()
    info = _build_info(Path(next(iter(spec.submodule_search_locations))))
    build = {
        "library": info.get("package_name") or (installed[0] if len(installed) == 1 else "onnxruntime"),
        "version": info.get("__version__"),
        **_providers(),
    }
    if len(installed) > 1:
        build["conflict"] = (
            f"{' and '.join(installed)} all install the onnxruntime module, so their files are mixed: "
            "pip uninstall every one of them, then install only the build this device needs"
        )
    _logger.info("onnxruntime: %s %s, providers %s", build["library"], build["version"], build["providers"])
    for problem in ("conflict", "error"):
        if problem in build:
            _logger.warning("onnxruntime: %s", build[problem])
    return build


def _build_info(package_dir: Path) -> dict[str, str]:
    """The build's own name and version (`capi/build_and_package_info.py`), read without importing it."""
    try:
        tree = ast.parse((package_dir / "capi" / "build_and_package_info.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    return {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def _providers() -> dict[str, Any]:
    loaded = sys.modules.get("onnxruntime")
    if loaded is not None:
        return {"providers": list(loaded.get_available_providers())}
    try:
        result = subprocess.run(
            [sys.executable, "-c", _ASK_PROVIDERS],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROVIDERS_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"providers": None, "error": f"asking onnxruntime for its providers failed: {err}"}
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        return {"providers": None, "error": f"onnxruntime cannot be imported: {lines[-1]}"}
    return {"providers": json.loads(result.stdout)}


def _distributions() -> list[str]:
    """The installed distributions that provide the `onnxruntime` module."""
    found = set()
    for dist in distributions():
        name = dist.metadata["Name"] or ""
        if not name.lower().startswith(("onnxruntime", "ort")):
            continue
        top_level = (dist.read_text("top_level.txt") or "").split()
        if "onnxruntime" in top_level or any(str(f) == "onnxruntime/__init__.py" for f in dist.files or ()):
            found.add(name)
    return sorted(found)
