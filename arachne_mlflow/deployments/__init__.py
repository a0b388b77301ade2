"""The MLflow deployments plugin for target `arachne-jetson`, and fleets of device servers.

MLflow loads `mlflow_plugin.py` (entry point group `mlflow.deployments`); `arachne-mlflow fleet` is
`commands.py`. Importing this package imports nothing else, MLflow least of all.
"""
