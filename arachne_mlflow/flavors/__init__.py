"""MLflow flavors for TFLite, ONNX and TVM models: `flavors.tflite`, `flavors.onnx`, `flavors.tvm`.

Each has the shape of an MLflow built-in flavor (`save_model`, `log_model`, `load_model`, ...).
The models they write carry an `arachne` flavor block (read by `arachne_mlflow.model.directory`) and a
`python_function` flavor served by `arachne_mlflow.pyfunc`. Import the submodule you need; this
package imports nothing heavy.
"""
