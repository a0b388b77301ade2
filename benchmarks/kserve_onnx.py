"""A KServe 0.21 model server for ONNX models, run by the KServe venv's Python (see peers.py).

KServe's Python server has no ONNX runtime of its own: this is the `kserve.Model` a user writes,
with the onnxruntime session options the device server uses (the library's defaults, CPU
provider). Its access and latency logs are off, as ours is.

    python kserve_onnx.py HTTP_PORT NAME=MODEL.onnx [NAME=MODEL.onnx ...]
"""

import sys
import uuid

import kserve
import kserve.logging
import onnxruntime
from kserve import InferOutput, InferRequest, InferResponse


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.ready = True

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        feeds = {item.name: item.as_numpy() for item in payload.inputs}
        results = self.session.run(self.output_names, feeds)
        outputs = []
        for name, array in zip(self.output_names, results):
            output = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            output.set_data_from_numpy(array, binary_data=True)
            outputs.append(output)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or str(uuid.uuid4()))


if __name__ == "__main__":
    port, pairs = int(sys.argv[1]), [arg.split("=", 1) for arg in sys.argv[2:]]
    for logger in kserve.logging.KSERVE_LOG_CONFIG["loggers"].values():
        logger["level"] = "WARNING"
    server = kserve.ModelServer(http_port=port, enable_grpc=False, enable_latency_logging=False, workers=1)
    server.start([OnnxModel(name, path) for name, path in pairs])
