"""The Open Inference Protocol over gRPC: messages (`inference_pb2`, generated) and their tensor codec.

Needs the `grpc` extra (protobuf); importing `arachne_mlflow.protocol` alone does not load it.
"""
