"""Logging: JSON lines for machines, text for a terminal; every line with its run and role."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

from opentelemetry import trace

from ledgerflow._telemetry import POSITION, ROLE, RUN_ID, TRACING

LogFormat = Literal["auto", "json", "text"]

CONTEXT_FIELDS = ("role", "run_id", "position")
"""Set on every record by :class:`ContextFilter` (None when unknown)."""

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "where",  # TextFormatter's
    "context",
    *CONTEXT_FIELDS,
    "trace_id",
    "span_id",
}
"""LogRecord attributes that are not a caller's ``extra``."""

_process_role: str | None = None


class ContextFilter(logging.Filter):
    """Copies the log context (role, run, position, trace) onto each record; a value the
    caller gave in ``extra`` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "role", None) is None:
            record.role = ROLE.get() or _process_role
        if getattr(record, "run_id", None) is None:
            record.run_id = RUN_ID.get()
        if getattr(record, "position", None) is None:
            record.position = POSITION.get()
        record.trace_id = record.span_id = None
        if TRACING.enabled:
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                record.trace_id = f"{context.trace_id:032x}"
                record.span_id = f"{context.span_id:016x}"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, role, message, then run_id, position,
    trace_id, span_id when known, the caller's ``extra`` fields, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": getattr(record, "role", None),
            "message": record.getMessage(),
        }
        for name in ("run_id", "position", "trace_id", "span_id"):
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                line.setdefault(name, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [role]: message  run_id=... position=...`` for people."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(where)s: %(message)s%(context)s")

    def format(self, record: logging.LogRecord) -> str:
        role = getattr(record, "role", None)
        record.where = f" [{role}]" if role else ""
        pairs = [
            f"{name}={value}"
            for name in ("run_id", "position")
            if (value := getattr(record, name, None)) is not None
        ]
        record.context = "  " + " ".join(pairs) if pairs else ""
        return super().format(record)


def resolve_format(fmt: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    """``auto``: text on a terminal, JSON lines otherwise (a file, a pipe, a log shipper)."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure_logging(
    level: str | int = "INFO",
    fmt: LogFormat = "auto",
    *,
    role: str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) as JSON lines or text.

    Idempotent: a handler this function installed before is replaced, any other one (a
    test's capture) is left alone. ``role`` is the process's role, for lines no role's
    task wrote (``serve`` runs several roles and sets each one's in its task).
    """
    global _process_role
    _process_role = role
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    handler.set_name("ledgerflow")
    handler.addFilter(ContextFilter())
    chosen = resolve_format(fmt, out)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "ledgerflow"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
