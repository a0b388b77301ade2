"""The module MLflow loads for target `arachne-jetson` (entry point group `mlflow.deployments`).

    mlflow deployments create -t arachne-jetson://jetson-1:5051 --name detector -m models:/detector@champion

MLflow looks up `run_local`, `target_help` and exactly one `BaseDeploymentClient` subclass here,
so this module imports MLflow; the package `arachne_mlflow.deployments` does not.
"""

from __future__ import annotations

from arachne_mlflow.deployments.deployment_client import ArachneJetsonDeploymentClient
from arachne_mlflow.deployments.local import run_local
from arachne_mlflow.fleet.device import SCHEME


def target_help() -> str:
    """What `mlflow deployments help -t arachne-jetson` prints."""
    return f"""\
Target {SCHEME}: deploy `arachne` models (TFLite, ONNX, TVM logged with arachne_mlflow.flavors)
to arachne-mlflow device servers (`arachne-mlflow serve` on each device).

Target URIs:
  {SCHEME}                               the device in $ARACHNE_DEVICE (default localhost:5051)
  {SCHEME}://HOST:PORT                   one device ({SCHEME}:/HOST:PORT too; [::1]:PORT for IPv6)
  {SCHEME}://HOST1:PORT,HOST2:PORT       a fleet: every command acts on each device, in parallel
  {SCHEME}://cam-1,cam-2                 devices of the fleet file, by name
  {SCHEME}://@lyon                       a group of the fleet file (@all: every device in it)
  The fleet file (YAML: devices, groups, defaults) is -C fleet=PATH, else $ARACHNE_FLEET,
  else ~/.arachne-mlflow/fleet.yaml.

Config (-C key=value on create, update, delete) and environment (every command):
  token=T            $ARACHNE_TOKEN            bearer token of the device servers
  tls=true           $ARACHNE_TLS              talk https
  ca_cert=F          $ARACHNE_CA_CERT          CA bundle that signed the devices' certificates
  connect_timeout=S  $ARACHNE_CONNECT_TIMEOUT  seconds to open a connection (default 3)
  timeout=S          $ARACHNE_TIMEOUT          seconds to wait for an answer (default 10)
  upload_timeout=S                             seconds an upload may take, loading included (default 600)
  fleet=PATH         $ARACHNE_FLEET            the fleet file
  parallel=N                                   devices worked on at once (default: all, up to 256)
  min_success=N|P%                             succeed when N devices (or P percent) got it (default: all)
  converge=true                                create acts like update when the deployment exists
  retarget=true                                create/update: this target becomes the deployment's recorded one
  forget=true                                  delete: the registry forgets devices that cannot be reached
  progress=B                                   progress bars, per batch and per upload (default: on a terminal)
  report=false                                 no per-device table on stderr
  strategy=all|rolling|canary                  how a push moves through the devices (default rolling)
  batch=N|P%                                   devices per batch of rolling and canary (default 25%)
  canary=N|P%                                  the canary batch, first (default 10%)
  max_failures=N                               halt once more than N devices failed (default: no limit)
  gate_timeout=S                               seconds for readiness and a smoke inference (default 5)
  gate_seconds=S                               watch each device's inference errors S seconds after the switch
  gate_max_p99_ms=MS                           time the new version on each device: p99 within MS ms
  gate_latency_regression=P%                   ... p99 and median at most P% above the version it replaced
  gate_repeats=N                               timed runs per latency measurement (default 20)
  run-local takes the options of `arachne-mlflow serve` instead: host, port, model_store, token,
  ssl_certfile, ssl_keyfile, ... (without model_store, a new temporary store)

Model URIs: anything MLflow resolves (runs:/ID/model, models:/NAME/1, models:/NAME@ALIAS,
models:/m-ID, a local path). Only the files MLmodel names are pushed. The device keeps serving
the old version until the new one has loaded. create and update bring every device to the model
(absent: pushed, another version: replaced, the same: left alone) and report each device; any
device left without it makes the command fail, unless min_success allows it. Devices are pushed
batch by batch; each one that took the new version must pass a health gate (ready, a smoke
inference with the model's input example that matches its signature) before the next batch. A
failed gate, or more than max_failures failed devices, halts the rollout: the devices it updated
get their previous version back (instantly, from their own disk), the others are untouched, and
the command fails. `arachne-mlflow fleet rollback NAME` takes a deployment back a version. A registry model's
deployment is recorded in the registry (tags arachne.deploy.NAME and arachne.devices.NAME), so
`arachne-mlflow fleet status` shows drift and `arachne-mlflow fleet sync [--watch S]` converges.

Examples:
  mlflow deployments create -t {SCHEME}://jetson-1:5051 --name detector -m models:/detector@champion
  mlflow deployments update -t {SCHEME}://@lyon --name detector -m models:/detector@champion -C min_success=90%
  mlflow deployments predict -t {SCHEME}://jetson-1:5051 --name detector --input-path in.json
  mlflow deployments run-local -t {SCHEME} --name detector -m models:/detector/1 -C port=5051
"""


__all__ = ["ArachneJetsonDeploymentClient", "run_local", "target_help"]
