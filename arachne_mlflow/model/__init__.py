"""An MLflow model directory with the `arachne` flavor, read without MLflow: its MLmodel block, tensor
specs, files, digest and archive, and the earlier Arachne Runtime's `env.yaml` and package tar.

Nothing here imports a DNN library, MLflow or the runtime, so a device server and a client can
read a model the same way.
"""
