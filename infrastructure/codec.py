"""JSON on the hot paths (event bodies, command requests and replies, read-model columns):
orjson, with the standard library for the rare values orjson refuses, so nothing that
``json`` accepted is ever refused."""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes. orjson refuses integers beyond 64 bits, non-string keys
    and strings with lone surrogates: those go through ``json``, which takes them."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    """Parse JSON. orjson refuses NaN, Infinity and integers beyond 64 bits, which ``json``
    reads: for those (and to raise ``json``'s own error on bad input), ``json`` decides."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
