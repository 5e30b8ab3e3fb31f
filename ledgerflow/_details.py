"""A refusal's details for people: shared by the SDK's errors and the CLI, which must
not load the domain (its imports stay light)."""

from __future__ import annotations

from typing import Any


def detail_line(detail: Any) -> str | None:
    """A validation error's detail for people (``loc.of.field: what is wrong``); None for
    any other detail (a ``reason``, say)."""
    if not isinstance(detail, dict) or "msg" not in detail:
        return None
    loc = detail.get("loc")
    where = ".".join(map(str, loc)) if isinstance(loc, list | tuple) else ""
    return f"{where}: {detail['msg']}" if where else str(detail["msg"])
