"""Stored events keep the trace context of the command that appended them, compatibly."""

from __future__ import annotations

import json
from uuid import UUID

from eventsourcing.persistence import Mapper

from domain.ids import run_id_for
from infrastructure.bootstrap import bootstrap
from infrastructure.event_log import read_after
from infrastructure.settings import Settings
from infrastructure.telemetry.stamping import stamping
from services import commands as c

TRACEPARENT = "00-0b5c6f4e8a834d8e9b0a3f7f2c1d9e11-00000000000000aa-01"


def test_a_stamped_event_keeps_its_traceparent_and_old_code_still_loads_it() -> None:
    app = bootstrap(Settings(database_url="memory://"))
    try:
        app.register_workflow(c.RegisterWorkflow(name="shop"))
        run_id = run_id_for("shop", "order-1")
        with stamping({run_id: TRACEPARENT}):
            app.start_run(c.StartRun(workflow="shop", key="order-1"))
        records = read_after(app, 0, 100)
        ours = [r for r in records if r.originator_id == run_id]
        others = [r for r in records if r.originator_id != run_id]
        assert ours and all(r.traceparent == TRACEPARENT for r in ours)
        assert all("_traceparent" not in r.data for r in ours)
        assert others and all(r.traceparent is None for r in others)  # unstamped, as before
        assert "traceparent" not in json.dumps(ours[0].to_json())  # nor on the wire
        assert app.get_run(run_id).workflow == "shop"  # replays as ever
        # Code that knows nothing of stamps (eventsourcing's own Mapper) replays it too.
        plain = Mapper[UUID](transcoder=app.mapper.transcoder)
        stored = [
            n
            for n in app.recorder.select_notifications(start=0, limit=100)
            if n.originator_id == run_id
        ]
        run = None
        for notification in stored:
            run = plain.to_domain_event(notification).mutate(run)  # type: ignore[attr-defined]
        assert run is not None and run.workflow == "shop"
    finally:
        app.close()
