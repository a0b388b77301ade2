"""The MLflow deployments plugin for target `arachne-jetson` (entry point group `mlflow.deployments`).

    mlflow deployments create -t arachne-jetson://jetson-1:5051 --name detector -m models:/detector@champion

MLflow looks up `run_local`, `target_help` and exactly one `BaseDeploymentClient` subclass here.
"""

from __future__ import annotations

from arachne_mlflow.deployments.local import run_local
from arachne_mlflow.deployments.plugin import ArachneJetsonDeploymentClient
from arachne_mlflow.deployments.targets import SCHEME


def target_help() -> str:
    """What `mlflow deployments help -t arachne-jetson` prints."""
    return f"""\
Target {SCHEME}: deploy `arachne` models (TFLite, ONNX, TVM logged with arachne_mlflow.flavors)
to arachne-mlflow device servers (`arachne-mlflow serve` on each device).

Target URIs:
  {SCHEME}                               the device in $ARACHNE_DEVICE (default localhost:5051)
  {SCHEME}://HOST:PORT                   one device ({SCHEME}:/HOST:PORT works too)
  {SCHEME}://HOST1:PORT,HOST2:PORT       a fleet: every command acts on each device, in parallel

Config (-C key=value on create, update, delete) and environment (every command):
  token=T       $ARACHNE_TOKEN     bearer token of the device servers
  tls=true      $ARACHNE_TLS       talk https
  ca_cert=F     $ARACHNE_CA_CERT   CA bundle that signed the devices' certificates
  timeout=S     $ARACHNE_TIMEOUT   seconds per request (default 60)
  progress=B                       upload progress bar (default: on a terminal, models >= 1 MiB)
  run-local takes the options of `arachne-mlflow serve` instead: host, port, model_store, token,
  ssl_certfile, ssl_keyfile, ... (without model_store, a new temporary store)

Model URIs: anything MLflow resolves (runs:/ID/model, models:/NAME/1, models:/NAME@ALIAS,
models:/m-ID, a local path). Only the files MLmodel names are pushed. The device keeps serving
the old version until the new one has loaded; a fleet push reports each device.

Examples:
  mlflow deployments create -t {SCHEME}://jetson-1:5051 --name detector -m models:/detector@champion
  mlflow deployments predict -t {SCHEME}://jetson-1:5051 --name detector --input-path in.json
  mlflow deployments run-local -t {SCHEME} --name detector -m models:/detector/1 -C port=5051
"""


__all__ = ["ArachneJetsonDeploymentClient", "run_local", "target_help"]
