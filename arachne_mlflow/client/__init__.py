"""The one client of the device server: `DeviceClient` (requests for control calls, `transport` for infer)."""

from arachne_mlflow.client.device import DeviceClient

__all__ = ["DeviceClient"]
