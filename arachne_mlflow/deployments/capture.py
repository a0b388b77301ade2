"""`-C capture=<JSON or a YAML/JSON file>`: field-capture rules a push sets on each device after install.

The rules are read and checked on the host (model/capture_rules.py) before any device is touched;
`{}` turns capture off on the devices whatever the model's MLmodel says. A device that took the
model but refused the rules is reported failed, with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from arachne_mlflow.deployments.results import DEPLOYED, FAILED, UNCHANGED, DeviceResult
from arachne_mlflow.errors import ArachneError, InvalidInputError
from arachne_mlflow.fleet.connection import Connection
from arachne_mlflow.model.capture_rules import parse_rules
from arachne_mlflow.protocol import bounded_json

MAX_RULES_BYTES = 16 * 1024


def capture_setting(value: Any) -> dict[str, Any] | None:
    """The rules `-C capture` names, as the device route takes them (None: not given; `{}`: off)."""
    if value is None:
        return None
    text = str(value).strip()
    if text.startswith("{"):
        data = bounded_json.loads(text, "config capture", max_bytes=MAX_RULES_BYTES, max_containers=16)
    else:
        data = _read_file(Path(text).expanduser())
    rules = parse_rules(data, "config capture")
    return {} if rules is None else rules.to_dict()


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise InvalidInputError(f"config capture must be a JSON object or a YAML/JSON file; no file {path}")
    if path.stat().st_size > MAX_RULES_BYTES:
        raise InvalidInputError(f"config capture: {path} is larger than {MAX_RULES_BYTES} bytes")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"config capture: {path} is not YAML or JSON: {err}") from err


def set_capture(
    results: list[DeviceResult], connection: Connection, name: str, rules: dict[str, Any], parallel: int
) -> list[DeviceResult]:
    """`results` with the rules set on each device that holds the model now; one that refused them failed."""
    from arachne_mlflow.deployments.converge import on_devices  # (converge imports targets, which imports this)

    def one(result: DeviceResult) -> DeviceResult:
        if result.state not in (DEPLOYED, UNCHANGED) or result.undone:
            return result
        try:
            with connection.client(result.device) as client:
                client.set_capture_rules(name, rules)
        except ArachneError as err:
            result.state, result.error = FAILED, f"installed, but the capture rules were not set: {err}"
        return result

    return on_devices(results, one, parallel)
