"""Numeric tensor data of a large JSON message, read into numpy without a Python object per number.

A JSON parser makes a Python float or int of every number (24-32 bytes each, plus the list that
holds them) before anything can look at the names, datatypes and shapes of the tensors, so a
request that the model would refuse still costs many times its size in memory. For a message
over `SMALL_MESSAGE` bytes the codec parses only its structure: `lift` finds every
`"data": [...]` array that holds no strings or objects, `LiftedArrays.header` is the text with
each replaced by its index, and `LiftedArrays.parse` reads one of them straight into an array, a
slice of text at a time, once the tensor has been checked against the model.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import orjson

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol.datatypes import BFLOAT16

#: Messages up to this size are parsed whole: their numbers cannot take much memory.
SMALL_MESSAGE = 64 * 1024
_SLICE = 256 * 1024  # text parsed at a time (cut after a comma)
_DATA_KEY = re.compile(rb'"data"\s*:\s*\[')
_SPACE = np.frombuffer(b" \t\r\n", np.uint8)
# What the text of each kind of array may hold besides these words (checked before parsing).
_ALLOWED = {"f": b"0123456789+-.eE, \t\r\n", "i": b"0123456789-, \t\r\n", "u": b"0123456789, \t\r\n", "b": b", \t\r\n"}
_WORDS = {"f": (b"NaN", b"Infinity"), "i": (), "u": (), "b": (b"true", b"false")}


def loads(data: Any) -> Any:
    """orjson (several times faster than the stdlib); the stdlib for what orjson refuses, such as the
    NaN and Infinity literals tritonclient writes, and for the error message."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise InvalidInputError(f"request body is not valid JSON: {type(err).__name__}: {err}") from err


class LiftedArrays:
    """The `"data"` arrays lifted out of `text[:end]`: `text[start:stop]` for each index."""

    def __init__(self, text: bytes | bytearray, end: int, spans: list[tuple[int, int]]):
        self.text = text
        self.end = end
        self.spans = spans
        self._taken: set[int] = set()

    @property
    def rest_size(self) -> int:
        """The bytes of the message besides the arrays (what `header` holds, but for the indices)."""
        return self.end - sum(stop - start for start, stop in self.spans)

    def header(self) -> bytes:
        """The message with each array replaced by its index."""
        pieces, copied, view = [], 0, memoryview(self.text)
        for index, (start, stop) in enumerate(self.spans):
            pieces += [view[copied:start], b"%d" % index]
            copied = stop
        pieces.append(view[copied : self.end])
        return b"".join(pieces)

    def parse(self, index: Any, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Array `index` as a `shape` array of `dtype`, refused unless its text is exactly that (lists
        nested no deeper than the shape, as many numbers as it has elements)."""
        if type(index) is not int or not 0 <= index < len(self.spans) or index in self._taken:
            raise InvalidInputError(f"tensor {name!r}: needs 'data' (a list) or parameters.binary_data_size")
        self._taken.add(index)
        kind = "f" if dtype == BFLOAT16 else dtype.kind
        if kind not in _ALLOWED:
            raise InvalidInputError(f"tensor {name!r}: BYTES data must be strings")
        start, end = self.spans[index][0] + 1, self.spans[index][1] - 1  # inside the outer brackets
        text = self.text
        count = math.prod(shape)
        if count == 0:
            if end - start > SMALL_MESSAGE or text[start:end].translate(None, b"[], \t\r\n"):
                raise InvalidInputError(f"tensor {name!r}: its shape has no elements, 'data' has some")
            return np.empty(shape, dtype)
        elements = text.count(b",", start, end) + 1
        if elements != count:  # (before allocating: the text must hold the elements the shape says)
            raise InvalidInputError(f"tensor {name!r}: its shape needs {count} elements, 'data' has {elements}")
        nested = text.find(b"[", start, end) >= 0 or text.find(b"]", start, end) >= 0
        out = np.empty(count, dtype)
        filled, depth = 0, 0
        while start < end:
            cut = end if end - start <= _SLICE else text.rfind(b",", start, start + _SLICE)
            if cut <= start:  # one number longer than a slice
                cut = text.find(b",", start + _SLICE, end)
                cut = end if cut < 0 else cut
            piece = text[start:cut]
            if nested:
                depth = _nesting(piece, depth, len(shape) - 1, name)
                piece = piece.translate(None, b"[]")
            values = _values(piece, kind, dtype, name)
            if filled + len(values) > count:
                break
            out[filled : filled + len(values)] = values
            filled += len(values)
            start = cut + 1
        if filled != count or depth:
            raise InvalidInputError(f"tensor {name!r}: 'data' is not a list of {count} {dtype.name} values")
        return out.reshape(shape)


def lift(text: bytes | bytearray, end: int) -> LiftedArrays:
    """The arrays of numbers under a `"data"` key in `text[:end]` (found, not copied)."""
    spans, position = [], 0
    while (match := _DATA_KEY.search(text, position, end)) is not None:
        start = match.end() - 1
        position = match.end()
        # the array holds no string or object: it ends at the last ']' before the next '"', '{' or '}'
        stop = min((i for i in (text.find(c, start, end) for c in (b'"', b"{", b"}")) if i >= 0), default=end)
        close = text.rfind(b"]", start, stop)
        if close >= 0:
            spans.append((start, close + 1))
            position = close + 1
    return LiftedArrays(text, end, spans)


def _values(piece: bytes, kind: str, dtype: np.dtype, name: str) -> np.ndarray:
    """The numbers of one slice of an array's text (brackets removed), checked to be of `kind`."""
    rest = piece.translate(None, _ALLOWED[kind])
    for word in _WORDS[kind]:
        rest = rest.replace(word, b"")
    if rest:
        raise InvalidInputError(f"tensor {name!r}: 'data' holds values that are not {dtype.name}")
    try:
        return np.array(loads(b"[" + piece + b"]"), dtype=dtype)
    except (OverflowError, ValueError, TypeError) as err:
        raise InvalidInputError(f"tensor {name!r}: 'data' does not fit {dtype.name}: {err}") from err


def _nesting(piece: bytes, depth: int, max_depth: int, name: str) -> int:
    """The bracket depth after `piece`, refused if its brackets do not nest lists (`[1[2]]`, `[1]]`...)
    or nest them deeper than `max_depth`.

    Slices are cut after commas, so a slice's start and end count as separators.
    """
    codes = np.frombuffer(piece, np.uint8)
    codes = codes[~np.isin(codes, _SPACE)]
    opens, closes, commas = codes == ord("["), codes == ord("]"), codes == ord(",")
    levels = depth + np.cumsum(opens.view(np.int8) - closes.view(np.int8), dtype=np.int64)
    after_separator = np.concatenate(([True], opens[:-1] | commas[:-1]))
    before_separator = np.concatenate((closes[1:] | commas[1:], [True]))
    if len(levels) and (levels.min() < 0 or levels.max() > max_depth):
        raise InvalidInputError(f"tensor {name!r}: the lists in 'data' do not nest as its shape does")
    if (opens & ~after_separator).any() or (closes & ~before_separator).any():
        raise InvalidInputError(f"tensor {name!r}: the lists in 'data' are not nested properly")
    return int(levels[-1]) if len(levels) else depth
