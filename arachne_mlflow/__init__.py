"""arachne-mlflow: one API for TFLite, ONNX and TVM models, MLflow flavors, and edge serving.

Importing the package loads no DNN library, no MLflow and no web framework; each loads only
when the code that needs it runs.
"""

from arachne_mlflow.errors import ArachneError

__version__ = "0.1.0"
__all__ = ["ArachneError", "__version__"]
