"""Subject and stream names, all derived from the configured subject prefix."""

from __future__ import annotations

import re
from dataclasses import dataclass

HEADER_POSITION = "Ledgerflow-Position"
HEADER_PREV_POSITION = "Ledgerflow-Prev-Position"
HEADER_ORIGINATOR_ID = "Ledgerflow-Originator-Id"
HEADER_VERSION = "Ledgerflow-Version"
HEADER_TYPE = "Ledgerflow-Type"
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_TRACEPARENT = "traceparent"


@dataclass(frozen=True)
class Names:
    """``ledgerflow`` gives stream LEDGERFLOW_EVENTS and subjects ``ledgerflow.evt.>``.

    Another prefix gives its own streams (``t1`` -> T1_EVENTS), so test sessions and
    tenants sharing one nats-server never see each other's messages.
    """

    prefix: str = "ledgerflow"

    @property
    def _stem(self) -> str:
        return re.sub(r"[^A-Za-z0-9]", "_", self.prefix).upper()

    @property
    def events_stream(self) -> str:
        return f"{self._stem}_EVENTS"

    @property
    def tasks_stream(self) -> str:
        return f"{self._stem}_TASKS"

    @property
    def events_wildcard(self) -> str:
        return f"{self.prefix}.evt.>"

    def event_subject(self, aggregate: str, event_type: str) -> str:
        return f"{self.prefix}.evt.{aggregate}.{event_type}"

    def command(self, name: str) -> str:
        return f"{self.prefix}.cmd.{name}"

    @property
    def commands_wildcard(self) -> str:
        return f"{self.prefix}.cmd.*"

    def task(self, queue: str) -> str:
        return f"{self.prefix}.task.{queue}"

    def held(self, run_id: str) -> str:
        """Core NATS subject the worker holding an eager start answers on (ADR 17)."""
        return f"{self.prefix}.held.{run_id}"

    def consumer(self, projection: str) -> str:
        """Durable JetStream consumer name of a projection builder or process manager."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.prefix}-{projection}")


def traceparent(originator_id_hex: str, position: int) -> str:
    """W3C traceparent: one trace per aggregate (its id), one span per event (its position)."""
    return f"00-{originator_id_hex}-{position:016x}-01"
