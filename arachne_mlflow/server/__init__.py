"""The device server: a model store on disk served over the Open Inference Protocol (KServe V2).

Layers: `codec` (tensors) -> `app` (thin HTTP routes) -> `dataplane` -> `store` -> runtime.
Start it with `arachne-mlflow serve` or `python -m arachne_mlflow.server`; it never imports MLflow.
"""
