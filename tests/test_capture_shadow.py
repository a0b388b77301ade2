"""Field capture of the requests a shadow model answers differently: rules, a real server with two real
ONNX models, the shadow's errors and rate bound, and `save_model(capture=...)`."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import yaml

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.flavors import onnx as onnx_flavor
from arachne_mlflow.model.capture_rules import ShadowRule, parse_rules
from arachne_mlflow.protocol.capture_format import closed_segments, iter_samples
from tests.helpers import models
from tests.helpers.model_dirs import runtime_details, write_model_dir
from tests.helpers.servers import ThreadServer
from tests.helpers.waiting import wait_for

TOKEN = "shadow-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- rules ------------------------------------------------------------------------------------


def test_shadow_rules_parse_with_defaults_and_round_trip():
    rules = parse_rules({"rate": 1, "shadow": {"model": "twin"}})
    assert rules.shadow == ShadowRule(model="twin", atol=1e-3, rtol=0.0, output=None, per_second=10.0)
    full = parse_rules({"rate": 1, "shadow": {"model": "t", "atol": 0, "rtol": 0.1, "output": "y", "per_second": 0.5}})
    assert parse_rules(full.to_dict()) == full and parse_rules(rules.to_dict()) == rules


@pytest.mark.parametrize(
    ("shadow", "words"),
    [
        ("twin", "'shadow' must be a mapping"),
        ({}, "'model' must name a model"),
        ({"model": "../up"}, "'model' must name a model"),
        ({"model": "t", "modle": "t"}, "unknown keys \\['modle'\\]"),
        ({"model": "t", "atol": -1}, "'atol' must be in"),
        ({"model": "t", "rtol": float("inf")}, "'rtol' must be a number"),
        ({"model": "t", "output": ""}, "'output' must be an output's name"),
        ({"model": "t", "per_second": 0}, "'per_second' must be in"),
        ({"model": "t", "per_second": 5000}, "'per_second' must be in"),
    ],
)
def test_bad_shadow_rules_are_refused_naming_the_key(shadow, words):
    with pytest.raises(InvalidInputError, match=words):
        parse_rules({"rate": 1, "shadow": shadow}, "the rules")


# -- a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shadow_server(tmp_path_factory, onnx_linear_model, onnx_two_io_file):
    """`main` (onnx_linear) and its shadow `twin` (the same with W doubled: x = 0 answers alike,
    other inputs differently), `lone` and `busy` to set other rules on, and `pair` (other inputs)."""
    root = tmp_path_factory.mktemp("shadow-server")
    twin_file = root / "twin.onnx"
    twin_file.write_bytes(models.onnx_linear(1, scale=2.0).SerializeToString())
    twin = write_model_dir(root / "twin", "onnx", twin_file, runtime_details("onnx", twin_file))
    pair = write_model_dir(root / "pair", "onnx", onnx_two_io_file, runtime_details("onnx", onnx_two_io_file))
    server = ThreadServer(root / "store", token=TOKEN, grpc=False).start()
    served = {"main": onnx_linear_model, "twin": twin, "lone": onnx_linear_model, "busy": onnx_linear_model}
    server.deploy({**served, "pair": pair})
    yield server
    server.stop()


def _set_rules(server, name, rules):
    answer = requests.put(f"{server.url}/v2/repository/models/{name}/capture", json=rules, headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _answers(server, name, values):
    with DeviceClient("127.0.0.1", server.port, token=TOKEN) as device:
        return [device.infer(name, [np.full((1, 4), value, np.float32)])["y"] for value in values]


def _drain(server, name):
    assert requests.post(f"{server.url}/v2/capture/{name}/rollover", headers=AUTH, timeout=30).status_code == 200
    return [sample for path in closed_segments(server.store / ".capture" / name) for sample in iter_samples(path)]


def test_only_requests_the_shadow_answers_differently_are_kept(shadow_server):
    rules = _set_rules(shadow_server, "main", {"rate": 1.0, "shadow": {"model": "twin", "atol": 1e-4}})
    assert rules["rules"]["shadow"]["model"] == "twin"
    values = [0.0, 1.0, 0.0, 2.0, -1.0, 0.0, 3.0]
    counts = shadow_server.dataplane.capture.counts
    captured, dropped = counts.captured.get("main", 0), sum(n for key, n in counts.dropped.items() if key[0] == "main")
    before = len(_drain(shadow_server, "main"))
    served = _answers(shadow_server, "main", values)
    shadowed = _answers(shadow_server, "twin", values)
    differ = [v for v, a, b in zip(values, served, shadowed) if not np.allclose(a, b, rtol=0, atol=1e-4)]
    assert 0.0 not in differ and len(differ) >= 2  # (the models agree at 0 and nowhere near it)
    samples = _drain(shadow_server, "main")[before:]
    assert [float(s.inputs["x"][0, 0]) for s in samples] == differ
    truth = {v: (a, b) for v, a, b in zip(values, served, shadowed)}
    for sample in samples:
        answer, shadow_answer = truth[float(sample.inputs["x"][0, 0])]
        assert set(sample.outputs) == {"y", "shadow.y"}
        np.testing.assert_array_equal(sample.outputs["y"], answer)
        np.testing.assert_array_equal(sample.outputs["shadow.y"], shadow_answer)
        assert sample.meta["shadow_model"] == "twin" and sample.meta["shadow_revision"] == "1"
    assert counts.captured["main"] == captured + len(differ)
    assert sum(n for key, n in counts.dropped.items() if key[0] == "main") == dropped


def test_caps_count_only_the_samples_kept(shadow_server):
    _set_rules(
        shadow_server,
        "main",
        {
            "rate": 1.0,
            "per_day": 2,
            "keep_outputs": False,
            "shadow": {"model": "twin", "output": "y", "per_second": 1000},
        },
    )
    before = len(_drain(shadow_server, "main"))
    _answers(shadow_server, "main", [0.0] * 5 + [1.0, 2.0, 3.0])  # five agree: they spend nothing
    kept = _drain(shadow_server, "main")[before:]
    assert [float(s.inputs["x"][0, 0]) for s in kept] in ([1.0, 2.0], [1.0, 2.0, 3.0])  # (3.0: a new day began)
    assert all(set(s.outputs) == {"shadow.y"} for s in kept)  # keep_outputs: false drops only the model's own


def test_an_unknown_shadow_model_counts_errors_and_requests_still_answer(shadow_server, caplog):
    _set_rules(shadow_server, "lone", {"rate": 1.0, "shadow": {"model": "nobody"}})
    counts = shadow_server.dataplane.capture.counts
    before = counts.dropped.get(("lone", "shadow_error"), 0)
    with DeviceClient("127.0.0.1", shadow_server.port, token=TOKEN) as device:
        for value in range(4):
            answer = device.infer("lone", [np.full((1, 4), value, np.float32)])
            assert answer["y"].shape == (1, 3)
    wait_for(lambda: counts.dropped.get(("lone", "shadow_error")) == before + 4, timeout=60)
    assert _drain(shadow_server, "lone") == [] and "lone" not in counts.captured
    assert sum("'nobody' cannot run" in record.getMessage() for record in caplog.records) == 1  # (logged once)
    metrics = requests.get(f"{shadow_server.url}/metrics", headers=AUTH, timeout=10).text
    assert f'arachne_capture_dropped_total{{model="lone",reason="shadow_error"}} {before + 4.0}' in metrics


@pytest.mark.parametrize(
    "shadow", [{"model": "twin", "output": "probabilities"}, {"model": "pair"}], ids=["other-outputs", "other-inputs"]
)
def test_a_shadow_whose_tensors_do_not_match_counts_an_error(shadow_server, shadow):
    _set_rules(shadow_server, "lone", {"rate": 1.0, "shadow": {**shadow, "per_second": 1000}})
    counts = shadow_server.dataplane.capture.counts
    before = counts.dropped.get(("lone", "shadow_error"), 0)
    _answers(shadow_server, "lone", [1.0, 2.0])
    wait_for(lambda: counts.dropped.get(("lone", "shadow_error")) == before + 2, timeout=60)
    assert _drain(shadow_server, "lone") == []


def test_shadow_runs_over_the_rate_bound_are_dropped_busy(shadow_server):
    _set_rules(shadow_server, "busy", {"rate": 1.0, "shadow": {"model": "twin", "per_second": 0.01}})
    _answers(shadow_server, "busy", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # one run, then none for 100 s
    samples = _drain(shadow_server, "busy")
    assert [float(s.inputs["x"][0, 0]) for s in samples] == [1.0]
    assert shadow_server.dataplane.capture.counts.dropped[("busy", "shadow_busy")] == 5


# -- flavors ----------------------------------------------------------------------------------


def test_save_model_writes_checked_capture_rules(tmp_path, onnx_linear_file):
    rules = {"rate": 0.5, "per_hour": 10, "shadow": {"model": "twin", "atol": 0.01}}
    onnx_flavor.save_model(str(onnx_linear_file), tmp_path / "m", capture=rules)
    block = yaml.safe_load((tmp_path / "m" / "MLmodel").read_text())["flavors"]["arachne"]["capture"]
    assert parse_rules(block) == parse_rules(rules)
    onnx_flavor.save_model(str(onnx_linear_file), tmp_path / "off", capture={})
    assert "capture" not in yaml.safe_load((tmp_path / "off" / "MLmodel").read_text())["flavors"]["arachne"]
    with pytest.raises(InvalidInputError, match="capture: 'shadow': unknown keys"):
        onnx_flavor.save_model(str(onnx_linear_file), tmp_path / "bad", capture={"rate": 1, "shadow": {"mdl": "t"}})
    assert not (tmp_path / "bad").exists()
