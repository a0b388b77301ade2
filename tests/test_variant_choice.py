"""Choosing a variant for a device from what it reports in `GET /v2` (model/variants.py), and reading
the variants list from MLmodel (model/directory.py): pure, no DNN library is loaded."""

from __future__ import annotations

import pytest
import yaml

from arachne_mlflow.errors import IncompatibleModelError, InvalidInputError, ModelNotFoundError
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.model.variants import choose_variant, unmet_requirements

SIGNATURE = {
    "inputs": '[{"name": "x", "type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}}]',
    "outputs": '[{"name": "y", "type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3]}}]',
}
VARIANTS = [
    {
        "name": "tvm-jetson",
        "runtime": "tvm",
        "model_file": "variants/tvm-jetson/model.so",
        "tvm": {"device": "cuda", "arch": "aarch64"},
    },
    {
        "name": "onnx-gpu",
        "runtime": "onnx",
        "model_file": "variants/onnx-gpu/model.onnx",
        "requires": {"providers": ["CUDAExecutionProvider"], "min_version": "1.18"},
    },
    {"name": "tvm-pi", "runtime": "tvm", "model_file": "variants/tvm-pi/model.so", "tvm": {"arch": "arm64"}},
    {"name": "onnx", "runtime": "onnx", "model_file": "variants/onnx/model.onnx"},
]
JETSON = {
    "arch": "aarch64",
    "runtimes": [
        {"name": "onnx", "version": "1.19.0", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
        {"name": "tvm", "version": "0.21.0", "devices": ["cpu", "cuda"]},
    ],
}
PI = {"arch": "aarch64", "runtimes": [{"name": "tvm", "devices": ["cpu"]}, {"name": "onnx", "version": "1.17.3"}]}
GATEWAY = {"arch": "x86_64", "runtimes": [{"name": "onnx", "version": "1.20.1", "providers": ["CPUExecutionProvider"]}]}


def _write(path, block, signature=SIGNATURE):
    path.mkdir(parents=True, exist_ok=True)
    (path / "MLmodel").write_text(yaml.safe_dump({"flavors": {"arachne": block}, "signature": signature}))
    return path


@pytest.fixture
def variants_dir(tmp_path):
    return _write(tmp_path / "model", {"variants": VARIANTS})


@pytest.mark.parametrize(
    "device, chosen",
    [(JETSON, "tvm-jetson"), (PI, "tvm-pi"), (GATEWAY, "onnx")],
    ids=["jetson", "pi", "x86-gateway"],
)
def test_each_device_gets_the_first_variant_it_runs(variants_dir, device, chosen):
    model = read_model_dir(variants_dir, check_files=False, device=device)
    assert model.variant_name == chosen
    assert model.files()[1:] == [f"variants/{chosen}/" + model.model_file.rsplit("/", 1)[1]]
    assert [v.variant_name for v in model.variants] == [v["name"] for v in VARIANTS]
    assert choose_variant(model.variants, device).variant.variant_name == chosen


def test_reasons_name_what_each_variant_lacks(variants_dir):
    model = read_model_dir(variants_dir, check_files=False, device=GATEWAY)
    reasons = choose_variant(model.variants, PI).reasons
    assert reasons == {
        "tvm-jetson": ["needs TVM device cuda, the device has ['cpu']"],
        "onnx-gpu": [
            "needs onnxruntime provider CUDAExecutionProvider, the device did not report its onnxruntime providers",
            "needs onnx 1.18 or later, the device has 1.17.3",
        ],
    }
    none = choose_variant(model.variants, {"arch": "riscv64", "runtimes": [{"name": "tflite"}]})
    assert none.variant is None and len(none.reasons) == 4
    assert none.reasons["tvm-pi"] == [
        "needs CPU aarch64, the device is riscv64",
        "needs the 'tvm' runtime, the device has ['tflite']",
    ]
    with pytest.raises(IncompatibleModelError, match=r"no variant of the model can run on cam-7: variant 'tvm-jetson'"):
        none.required("cam-7")


def test_an_order_overrides_the_models(variants_dir):
    model = read_model_dir(variants_dir, check_files=False, device=JETSON)
    assert choose_variant(model.variants, JETSON, order=["onnx", "tvm-jetson"]).variant.variant_name == "onnx"
    choice = choose_variant(model.variants, GATEWAY, order=["nope", "tvm-pi"])
    assert choice.variant is None and "no such variant" in choice.reasons["nope"][0]


def test_unreported_facts_count_as_unmet(variants_dir):
    jetson = read_model_dir(variants_dir, check_files=False, variant="tvm-jetson")
    assert unmet_requirements(jetson, {"runtimes": [{"name": "tvm"}]}) == [
        "needs CPU aarch64, the device is unreported",
        "needs TVM device cuda, the device did not report its TVM devices",
    ]


def test_a_model_without_variants_is_a_one_variant_model(tmp_path):
    path = _write(tmp_path / "single", {"runtime": "onnx", "model_file": "model.onnx"})
    model = read_model_dir(path, check_files=False)
    assert not model.has_variants and model.variant_name == "onnx"
    assert [v.variant_name for v in model.variants] == ["onnx"]
    assert model.files() == ["MLmodel", "model.onnx"]


def test_with_files_only_variants_whose_files_are_here_are_chosen(variants_dir):
    for name in ("tvm-pi", "onnx"):
        (variants_dir / "variants" / name).mkdir(parents=True)
    (variants_dir / "variants/tvm-pi/model.so").write_bytes(b"x")
    assert read_model_dir(variants_dir, device=JETSON).variant_name == "tvm-pi"
    # none that is here runs: read, but loading it says why each variant cannot
    model = read_model_dir(variants_dir, device=GATEWAY)
    with pytest.raises(IncompatibleModelError) as refused:
        model.check_compatible()
    assert "variant 'tvm-pi': needs CPU aarch64" in str(refused.value)
    assert "variant 'onnx': its files are not in the model directory" in str(refused.value)
    (variants_dir / "variants/tvm-pi/model.so").unlink()
    with pytest.raises(ModelNotFoundError, match="none of the variants' files are here"):
        read_model_dir(variants_dir, device=JETSON)


@pytest.mark.parametrize(
    "variants, message",
    [
        ([], "must be a list of 1 to 16 variants"),
        ([{"name": "a"}] * 17, "must be a list of 1 to 16 variants"),
        ([{"name": "../x", "runtime": "onnx", "model_file": "m"}], "must match"),
        ([{"name": "a", "runtime": "onnx", "model_file": "m"}] * 2, "two variants are called 'a'"),
        ([{"name": "a", "runtime": "onnx", "model_file": "../m"}], "leaves the model directory"),
        ([{"name": "a", "runtime": "onnx", "model_file": "m", "requires": {"gpu": 1}}], "unknown 'requires' keys"),
        ([{"name": "a", "runtime": "onnx", "model_file": "m", "requires": {"arch": [1]}}], "list of names"),
        ([{"name": "a", "runtime": "onnx", "model_file": "m", "tolerance": {"atol": -1}}], "number >= 0"),
        ([{"name": "a", "runtime": "onnx", "model_file": "m", "tolerance": {"top1": 2}}], "at most 1"),
        ([{"name": "a", "runtime": "onnx"}], "lacks 'model_file'"),
    ],
)
def test_bad_variants_lists_are_refused(tmp_path, variants, message):
    with pytest.raises(InvalidInputError, match=message):
        read_model_dir(_write(tmp_path / "bad", {"variants": variants}), check_files=False)


def test_an_unknown_variant_name_is_refused(variants_dir):
    with pytest.raises(InvalidInputError, match=r"has no variant 'nope': it has \['tvm-jetson', 'onnx-gpu'"):
        read_model_dir(variants_dir, check_files=False, variant="nope")


def test_this_machine_is_asked_only_what_the_variants_need(tmp_path):
    from arachne_mlflow.model.variants import this_machine

    block = [
        {
            "name": "gpu",
            "runtime": "onnx",
            "model_file": "a.onnx",
            "requires": {"providers": ["CUDAExecutionProvider"]},
        },
        {"name": "cpu", "runtime": "onnx", "model_file": "b.onnx", "requires": {"providers": "CPUExecutionProvider"}},
    ]
    model = read_model_dir(_write(tmp_path / "m", {"variants": block}), check_files=False)
    assert model.variant_name == "cpu"  # this machine's onnxruntime has the CPU provider only
    assert "providers" not in next(r for r in this_machine()["runtimes"] if r["name"] == "onnx")
    onnx = next(r for r in this_machine(model.variants)["runtimes"] if r["name"] == "onnx")
    assert "CPUExecutionProvider" in onnx["providers"] and onnx["version"]
