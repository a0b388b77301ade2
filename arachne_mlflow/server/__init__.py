"""The device server: a model store on disk served over the Open Inference Protocol (KServe V2).

Layers: codecs (`protocol.codec`, `protocol.grpc.codec`) -> thin routes (`app` for HTTP,
`grpc_service` for gRPC with `--grpc-port`) -> `dataplane` -> `store` -> runtime.
Start it with `arachne-mlflow serve` or `python -m arachne_mlflow.server`; it never imports MLflow.
"""
