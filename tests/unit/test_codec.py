"""The hot paths' JSON codec takes everything the standard library takes."""

from __future__ import annotations

import json
import math

import pytest

from infrastructure import codec


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1, "b": [True, None, 1.5, "é"]},
        {"big": 2**70, "small": -(2**70)},  # beyond orjson's 64 bits
        {"lone": "\ud800"},  # a lone surrogate: not UTF-8
        {1: "a non-string key"},
    ],
)
def test_dumps_writes_what_json_would_read_back_the_same(value: object) -> None:
    assert json.loads(codec.dumps(value)) == json.loads(json.dumps(value))


def test_loads_reads_what_only_json_reads() -> None:
    for big in (2**64 + 1, 2**65 + 1, -(2**63) - 1, 10**20 + 1):
        read = codec.loads(f'{{"n": {big}}}'.encode())["n"]
        assert (type(read), read) == (int, big)  # never a float that loses digits
    assert math.isinf(codec.loads(b"[Infinity]")[0])
    assert codec.loads('{"a": "\\ud800"}') == {"a": "\ud800"}
    with pytest.raises(ValueError):
        codec.loads(b"{not json")
