"""Bounded JSON: size, container count and depth are refused before (or instead of) a costly parse."""

from __future__ import annotations

import pytest

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import bounded_json


def test_parses_what_fits():
    assert bounded_json.loads('{"a": [1, {"b": null}], "c": "x"}', "tag", max_bytes=100) == {
        "a": [1, {"b": None}],
        "c": "x",
    }
    assert bounded_json.loads(b"3", "answer", max_bytes=1) == 3


@pytest.mark.parametrize(
    ("text", "bounds", "words"),
    [
        ('"' + "x" * 200 + '"', {"max_bytes": 100}, "over the 100 allowed"),
        ("[" + "{}," * 50 + "{}]", {"max_bytes": 1000, "max_containers": 20}, "objects or arrays"),
        ("[" * 4900 + "]" * 4900, {"max_bytes": 10_000, "max_containers": 5000}, "not valid JSON"),
        ("[" * 40 + "]" * 40, {"max_bytes": 1000}, "nests deeper than 32"),
        ("{'a': 1}", {"max_bytes": 100}, "not valid JSON"),
        ("[" * 4900, {"max_bytes": 10_000, "max_containers": 4000}, "objects or arrays"),
    ],
)
def test_refuses_with_the_bound_it_broke(text, bounds, words):
    with pytest.raises(InvalidInputError, match=words) as caught:
        bounded_json.loads(text, "the alias answer", **bounds)
    assert "the alias answer" in str(caught.value)


def test_brackets_inside_strings_count_against_the_bound():
    with pytest.raises(InvalidInputError, match="objects or arrays"):
        bounded_json.loads('"' + "[" * 30 + '"', "tag", max_bytes=100, max_containers=10)
