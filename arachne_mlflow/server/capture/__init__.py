"""Field capture on the device: a sample of served requests kept on disk for delivery into MLflow.

The infer path answers first, then offers the request's decoded tensors to `Capture.offer`
(manager.py), which decides from the model's rules (model/capture_rules.py) whether to keep it
(sampler.py) before anything is copied, and hands what it keeps to a bounded queue that never
blocks. One writer thread (writer.py) appends the samples to each model's spool (spool.py) in
the segment format of protocol/capture_format.py. Routes (routes.py) list, download, delete and
roll over segments, and read or set a model's rules on the device.
"""

from arachne_mlflow.server.capture.manager import Capture

__all__ = ["Capture"]
