"""Each backend against a direct call of its own library: outputs must be bit-for-bit equal."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.errors import InvalidInputError


def _litert(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def test_tflite_equals_litert(tflite_cnn_file, rng):
    x = rng.standard_normal((1, 8, 8, 3)).astype(np.float32)
    raw = _litert(tflite_cnn_file)
    raw.set_tensor(raw.get_input_details()[0]["index"], x)
    raw.invoke()
    expected = raw.get_tensor(raw.get_output_details()[0]["index"])

    with arachne_runtime.init(runtime="tflite", model_file=str(tflite_cnn_file), num_threads=1) as m:
        m.set_input(0, x)
        m.run()
        np.testing.assert_equal(m.get_output(0), expected)
        assert m.get_input_details() == [
            {"name": "serving_default_image:0", "dtype": "float32", "shape": [-1, 8, 8, 3]}
        ]
        assert m.get_output_details()[0]["shape"] == [-1, 5]


def test_tflite_op_resolver_by_name(tflite_cnn_file, rng):
    """Options stored in MLmodel are YAML: the op resolver type may come as its name."""
    x = rng.standard_normal((1, 8, 8, 3)).astype(np.float32)
    with arachne_runtime.init("tflite", model_file=str(tflite_cnn_file)) as default:
        expected = default.infer([x])[0]
    name = "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
    with arachne_runtime.init("tflite", model_file=str(tflite_cnn_file), experimental_op_resolver_type=name) as m:
        np.testing.assert_allclose(m.infer([x])[0], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="is not one of"):
        arachne_runtime.init("tflite", model_file=str(tflite_cnn_file), experimental_op_resolver_type="FAST")


def test_tflite_resizes_batch(tflite_cnn_file, rng):
    """A batch of 3 through a model converted with batch 1 equals three single runs."""
    x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
    with arachne_runtime.init("tflite", model_file=str(tflite_cnn_file)) as m:
        m.set_input(0, x)
        m.run()
        batched = m.get_output(0)
        singles = []
        for row in x:
            m.set_input(0, row[None])
            m.run()
            singles.append(m.get_output(0))
    assert batched.shape == (3, 5)
    np.testing.assert_allclose(batched, np.concatenate(singles), rtol=1e-5, atol=1e-6)
    assert m._interpreter is None  # done() let go of the interpreter


def test_tflite_two_inputs_by_name(tflite_two_inputs_file, rng):
    a = rng.standard_normal((1, 4)).astype(np.float32)
    b = rng.standard_normal((1, 6)).astype(np.float32)
    raw = _litert(tflite_two_inputs_file)
    details = {d["name"]: d["index"] for d in raw.get_input_details()}
    with arachne_runtime.init("tflite", model_file=str(tflite_two_inputs_file)) as m:
        names = [d["name"] for d in m.get_input_details()]
        by_shape = {tuple(d["shape"][1:]): d["name"] for d in m.get_input_details()}
        m.set_input(by_shape[(4,)], a)
        m.set_input(by_shape[(6,)], b)
        m.run()
        outputs = [m.get_output(i) for i in range(len(m.get_output_details()))]
    for name in names:
        raw.set_tensor(details[name], a if name == by_shape[(4,)] else b)
    raw.invoke()
    expected = [raw.get_tensor(d["index"]) for d in raw.get_output_details()]
    for got, want in zip(outputs, expected):
        np.testing.assert_equal(got, want)


def test_onnx_equals_onnxruntime(onnx_two_io_file, rng):
    import onnxruntime as ort

    a = rng.standard_normal((1, 4)).astype(np.float32)
    b = rng.standard_normal((1, 4)).astype(np.float32)
    expected = ort.InferenceSession(str(onnx_two_io_file), providers=["CPUExecutionProvider"]).run(
        None, {"a": a, "b": b}
    )
    with arachne_runtime.init("onnx", model_file=str(onnx_two_io_file), providers=["CPUExecutionProvider"]) as m:
        m.set_input("a", a)
        m.set_input(1, b)
        m.run()
        np.testing.assert_equal(m.get_output("sum"), expected[0])
        np.testing.assert_equal(m.get_output(1), expected[1])
        assert [d["name"] for d in m.get_output_details()] == ["sum", "scaled"]


def test_onnx_dynamic_batch_reported_and_run(onnx_dynamic_file, rng):
    x = rng.standard_normal((5, 4)).astype(np.float32)
    with arachne_runtime.init("onnx", model_file=str(onnx_dynamic_file)) as m:
        assert m.get_input_details() == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]
        m.set_input(0, x)
        m.run()
        assert m.get_output(0).shape == (5, 3)


def test_onnx_unavailable_provider_falls_back_with_warning(onnx_linear_file):
    with pytest.warns(RuntimeWarning, match=r"\['CUDAExecutionProvider'\].*using \['CPUExecutionProvider'\]"):
        m = arachne_runtime.init(
            "onnx", model_file=str(onnx_linear_file), providers=[("CUDAExecutionProvider", {"device_id": 0})]
        )
    assert m.providers == ["CPUExecutionProvider"]


def test_onnx_session_options_dict(onnx_linear_file, rng):
    x = rng.standard_normal((1, 4)).astype(np.float32)
    options = {
        "intra_op_num_threads": 1,
        "graph_optimization_level": "ORT_ENABLE_BASIC",
        "session.intra_op.allow_spinning": "0",
    }
    with arachne_runtime.init("onnx", model_file=str(onnx_linear_file), sess_options=options) as m:
        m.set_input(0, x)
        m.run()
        assert m.get_output(0).shape == (1, 3)
    with pytest.raises(InvalidInputError, match="unknown onnxruntime session option 'bogus'"):
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file), sess_options={"bogus": 1})
    with pytest.raises(InvalidInputError, match=r"providers\[0\]"):
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file), providers=[42])


def _raw_tvm(model_file, inputs, params_file=None):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(model_file)), tvm.cpu())
    args = [tvm.runtime.tensor(x) for x in inputs]
    if params_file is not None:
        params = tvm.runtime.load_param_dict_from_file(str(params_file))
        arity = vm._get_function_arity("main")
        names = [vm._get_function_param_name("main", i) for i in range(len(inputs), arity)]
        args += [params[n] for n in names]
    out = vm["main"](*args)
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def test_tvm_equals_relax_vm(tvm_linear, rng):
    x = rng.standard_normal((1, 4)).astype(np.float32)
    expected = _raw_tvm(tvm_linear["model_file"], [x], tvm_linear["params_file"])
    with arachne_runtime.init(
        "tvm",
        model_file=str(tvm_linear["model_file"]),
        env_file=str(tvm_linear["env_file"]),
        params_file=str(tvm_linear["params_file"]),
    ) as m:
        m.set_input("x", x)
        m.run()
        np.testing.assert_equal(m.get_output(0), expected[0])
        assert m.get_input_details() == tvm_linear["model_spec"]["inputs"]


def test_tvm_tar_two_outputs(tvm_two_io, rng):
    a = rng.standard_normal((1, 4)).astype(np.float32)
    b = rng.standard_normal((1, 4)).astype(np.float32)
    expected = _raw_tvm(tvm_two_io["model_file"], [a, b])
    with arachne_runtime.init(
        "tvm", model_file=str(tvm_two_io["model_file"]), model_spec=tvm_two_io["model_spec"]
    ) as m:
        m.set_input(0, a)
        m.set_input(1, b)
        m.run()
        for i, want in enumerate(expected):
            np.testing.assert_equal(m.get_output(i), want)


def test_tvm_tar_is_linked_outside_its_directory(tvm_two_io, tmp_path, rng):
    """A `.tar` library loads without writing into its directory (a device's store is digested and signed)."""
    library = tmp_path / "model.tar"
    shutil.copyfile(tvm_two_io["model_file"], library)
    a, b = (rng.standard_normal((1, 4)).astype(np.float32) for _ in range(2))
    with arachne_runtime.init("tvm", model_file=str(library), model_spec=tvm_two_io["model_spec"]) as m:
        m.set_input(0, a)
        m.set_input(1, b)
        m.run()
        assert m.get_output(0).shape == (1, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tar"]


def test_tvm_params_as_dict(tvm_linear, rng):
    import tvm

    params = dict(tvm.runtime.load_param_dict_from_file(str(tvm_linear["params_file"])))
    x = rng.standard_normal((1, 4)).astype(np.float32)
    expected = _raw_tvm(tvm_linear["model_file"], [x], tvm_linear["params_file"])
    with arachne_runtime.init(
        "tvm", model_file=str(tvm_linear["model_file"]), model_spec=tvm_linear["model_spec"], params=params
    ) as m:
        np.testing.assert_equal(m.infer([x])[0], expected[0])


def test_tvm_without_spec_names_its_inputs(tvm_linear):
    with pytest.raises(InvalidInputError, match=r"carries no dtypes.*\['x'\]"):
        arachne_runtime.init(
            "tvm", model_file=str(tvm_linear["model_file"]), params_file=str(tvm_linear["params_file"])
        )


def test_tvm_missing_params_named(tvm_linear):
    with pytest.raises(InvalidInputError, match="params do not match"):
        arachne_runtime.init(
            "tvm",
            model_file=str(tvm_linear["model_file"]),
            model_spec=tvm_linear["model_spec"],
            params={"nope": np.zeros(1)},
        )
