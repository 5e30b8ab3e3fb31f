"""JSON on the hot paths (event bodies, command requests and replies, read-model columns):
orjson, with the standard library for the rare values orjson refuses, so nothing that
``json`` accepted is ever refused."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_NUMBER = re.compile(rb"\d{19}")
"""19 digits in a row: maybe an integer beyond 64 bits, which orjson would read as a float
(silently losing digits). Such documents are left to ``json``, which keeps them exact."""


def may_hold_big_ints(data: bytes | str) -> bool:
    return _LONG_NUMBER.search(data.encode() if isinstance(data, str) else data) is not None


def dumps(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes. orjson refuses integers beyond 64 bits, non-string keys
    and strings with lone surrogates: those go through ``json``, which takes them."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    """Parse JSON. orjson refuses NaN and Infinity, which ``json`` reads, and reads integers
    beyond 64 bits as floats: for those (and to raise ``json``'s own error on bad input),
    ``json`` decides."""
    if may_hold_big_ints(data):
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
