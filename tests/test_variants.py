"""Models with variants (flavors/variants.py, flavors/variants_build.py): built from one ONNX file,
checked against the reference when saved, loaded by pyfunc and the flavors, served by today's server."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import onnx
import pytest
import yaml

from arachne_mlflow.cli import main
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import ArachneError, IncompatibleModelError, InvalidInputError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.flavors import tvm as arachne_tvm
from arachne_mlflow.flavors import variants, variants_build
from arachne_mlflow.model.directory import read_model_dir
from tests.helpers import models
from tests.helpers.servers import ThreadServer

EXAMPLE = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("variants-src") / "model.onnx"
    onnx.save(models.onnx_linear("N"), str(path))
    return path


@pytest.fixture(scope="module")
def built(onnx_file, tmp_path_factory):
    messages = []
    builds = variants_build.build_variants(onnx_file, tmp_path_factory.mktemp("builds"), progress=messages.append)
    return builds, messages


@pytest.fixture(scope="module")
def variants_model(built, tmp_path_factory):
    path = tmp_path_factory.mktemp("variants") / "model"
    variants.save_model({name: b.variant for name, b in built[0].items()}, path, input_example=EXAMPLE)
    return path


def test_build_reports_each_build_with_time_and_size(built):
    builds, messages = built
    assert list(builds) == ["onnx", "onnx-int8", "tvm-x86_64", "tvm-aarch64"]
    for name, build in builds.items():
        assert build.seconds > 0 and build.bytes > 0
        assert f"building {name} ..." in messages and any(m.startswith(f"built {name} in ") for m in messages)
    assert builds["onnx-int8"].variant.tolerance == variants_build.INT8_TOLERANCE


def test_mlmodel_lists_the_variants_with_their_checks(variants_model):
    conf = yaml.safe_load((variants_model / "MLmodel").read_text())["flavors"]["arachne"]
    blocks = {b["name"]: b for b in conf["variants"]}
    assert list(blocks) == ["onnx", "onnx-int8", "tvm-x86_64", "tvm-aarch64"]
    assert conf["model_file"] == "variants/onnx/model.onnx"  # the reference, for readers older than variants
    assert blocks["onnx"]["check"]["reference"] is True
    int8 = blocks["onnx-int8"]["check"]
    assert int8["ran"] and 0 < int8["max_abs_diff"] <= 0.1 and int8["top1_agreement"] >= 0.9
    assert blocks["tvm-x86_64"]["check"]["max_abs_diff"] < 1e-4 and blocks["tvm-x86_64"]["check"]["top1_agreement"] == 1
    cross = blocks["tvm-aarch64"]["check"]
    assert cross == {"ran": False, "not_run": "needs CPU aarch64, the device is x86_64", "signature": "matches"}
    for block in blocks.values():
        assert (variants_model / block["model_file"]).is_file()
    assert not (variants_model / ".variants-scratch").exists()


def test_pyfunc_loads_the_first_variant_that_runs_here_or_the_one_named(variants_model):
    reference = mlflow.pyfunc.load_model(str(variants_model))
    assert reference.get_raw_model().runtime_name == "onnx"
    expected = reference.predict(EXAMPLE)
    tvm = mlflow.pyfunc.load_model(str(variants_model), model_config={"variant": "tvm-x86_64"})
    assert tvm.get_raw_model().runtime_name == "tvm"
    np.testing.assert_allclose(tvm.predict(EXAMPLE), expected, atol=1e-4)
    with pytest.raises(IncompatibleModelError, match="compiled by TVM for aarch64"):
        mlflow.pyfunc.load_model(str(variants_model), model_config={"variant": "tvm-aarch64"})


def test_flavors_load_their_runtimes_variant(variants_model):
    with arachne_tvm.load_model(str(variants_model)) as module:
        assert module.runtime_name == "tvm"
    with arachne_onnx.load_model(str(variants_model), variant="onnx-int8") as module:
        assert module.infer([EXAMPLE])[0].shape == (8, 3)
    with variants.load_model(str(variants_model)) as module:
        assert module.runtime_name == "onnx"
    from arachne_mlflow.flavors import tflite as arachne_tflite

    with pytest.raises(InvalidInputError, match="has no 'tflite' variant"):
        arachne_tflite.load_model(str(variants_model))


def test_a_variant_outside_its_tolerance_fails_the_save_with_the_figures(onnx_file, tmp_path):
    other = models.onnx_linear_scaled(1.5)
    with pytest.raises(InvalidInputError) as failed:
        variants.save_model(
            {"onnx": variants.Variant("onnx", str(onnx_file)), "wrong": variants.Variant("onnx", other)},
            tmp_path / "model",
            input_example=EXAMPLE,
        )
    assert (
        "variant 'wrong' disagrees with the reference variant 'onnx' on the input example: max abs difference"
        in str(failed.value)
    )
    assert not (tmp_path / "model").exists()
    # the same build passes with the tolerance it declares
    variants.save_model(
        {
            "onnx": variants.Variant("onnx", str(onnx_file)),
            "wide": variants.Variant("onnx", other, tolerance={"atol": 100, "top1": 0}),
        },
        tmp_path / "model",
    )
    assert read_model_dir(tmp_path / "model", variant="wide").check["example"] == "generated"


def test_a_variant_whose_signature_differs_is_refused(onnx_file, tmp_path):
    with pytest.raises(InvalidInputError, match="signature has 1 inputs"):
        variants.save_model(
            {
                "onnx": variants.Variant("onnx", str(onnx_file)),
                "two": variants.Variant("onnx", models.onnx_two_in_two_out()),
            },
            tmp_path / "model",
        )
    # a model that declares the signature's shapes but computes others fails when it is run
    with pytest.raises(
        InvalidInputError, match=r"on the generated example: output shapes \[\[1, 5\]\], the reference's"
    ):
        variants.save_model(
            {
                "onnx": variants.Variant("onnx", str(onnx_file)),
                "wider": variants.Variant("onnx", models.onnx_wider_than_declared()),
            },
            tmp_path / "model",
        )
    mod, weights = models.relax_module(models.onnx_two_in_two_out())
    with pytest.raises(InvalidInputError, match="signature has 1 inputs"):
        variants.save_model(
            {
                "onnx": variants.Variant("onnx", str(onnx_file)),
                "arm": variants.Variant("tvm", mod, params=weights, target=AARCH64),
            },
            tmp_path / "model",
        )
    assert not (tmp_path / "model").exists()


def test_log_model_logs_the_agreement_as_metrics(built, mlflow_store):
    with mlflow.start_run() as run:
        info = variants.log_model(
            {name: b.variant for name, b in built[0].items() if name != "tvm-aarch64"},
            name="model",
            input_example=EXAMPLE,
            registered_model_name="variants-model",
        )
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert set(metrics) == {
        f"variant.{n}.{k}" for n in ("onnx-int8", "tvm-x86_64") for k in ("max_abs_diff", "top1_agreement")
    }
    loaded = mlflow.pyfunc.load_model(f"models:/variants-model/{info.registered_model_version}")
    assert loaded.predict(EXAMPLE).shape == (8, 3)


def test_todays_server_serves_the_first_variant_it_runs(onnx_file, tmp_path):
    mod, weights = models.relax_module(models.onnx_linear("N"))
    path = tmp_path / "model"
    variants.save_model(
        {
            "arm": variants.Variant("tvm", mod, params=weights, target=AARCH64),
            "onnx": variants.Variant("onnx", str(onnx_file)),
        },
        path,
    )
    model = read_model_dir(path)
    assert model.variant_name == "onnx" and model.files()[:2] == ["MLmodel", "variants/onnx/model.onnx"]
    server = ThreadServer(tmp_path / "store", grpc=False).start()
    try:
        with DeviceClient("127.0.0.1", server.port) as device:
            device.upload_model("served", path)
            assert device.model_metadata("served")["platform"] == "arachne_onnx"
            out = device.infer("served", {"x": EXAMPLE})["y"]
            np.testing.assert_allclose(out, mlflow.pyfunc.load_model(str(path)).predict(EXAMPLE), rtol=1e-6)
            arm_files = ["MLmodel", *model.variant("arm").variant_files()]
            with pytest.raises(
                ArachneError, match="no variant of the model can run on this machine.*needs CPU aarch64"
            ):
                device.upload_model("arm-only", path, files=arm_files)
    finally:
        server.stop()


def test_cli_builds_and_shows(onnx_file, tmp_path, capsys):
    np.save(tmp_path / "x.npy", EXAMPLE)
    argv = [
        "variants",
        "build",
        str(onnx_file),
        "--builds",
        "onnx,onnx-int8",
        "--input-example",
        str(tmp_path / "x.npy"),
    ]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "built onnx-int8 in" in err
    assert out.splitlines()[0].split() == ["VARIANT", "SECONDS", "BYTES", "MAX", "ABS", "DIFF", "TOP-1", "CHECK"]
    assert "within tolerance" in out.splitlines()[2]
    assert main(["variants", "show", str(tmp_path / "out")]) == 0
    assert "runs, chosen" in capsys.readouterr().out.splitlines()[1]
    assert main([*argv[:3], "--builds", "nope", "--output", str(tmp_path / "bad")]) == 1
    assert "unknown builds ['nope']" in capsys.readouterr().err


def test_the_chooser_imports_neither_mlflow_nor_a_dnn_library():
    code = (
        "import sys; from arachne_mlflow.model import variants, directory; "
        "print(sorted(m for m in ('mlflow', 'onnxruntime', 'tvm', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
