"""A tour of the domain on PostgreSQL: two order runs, their decisions and their histories.

The SDK and the worker (which will drive these commands from plain Python workflows) come
in a later issue; here the commands a worker and the process managers will send are sent
by hand, through the real service layer and event store.
"""

from __future__ import annotations

import uuid
from typing import Any

from rich.console import Console
from rich.table import Table

from domain.values import RetryPolicy
from infrastructure.bootstrap import bootstrap
from infrastructure.settings import Settings
from services import commands as c
from services.workflow_runs import WorkflowRuns

console = Console()


def history(app: WorkflowRuns, run_id: uuid.UUID, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("version", "event", "data"):
        table.add_column(column)
    for event in app.events.get(run_id):
        data: dict[str, Any] = {
            k: v
            for k, v in vars(event).items()
            if k not in {"originator_id", "originator_version", "timestamp", "originator_topic"}
        }
        table.add_row(str(event.originator_version), type(event).__name__, _short(data))
    console.print(table)


def _short(data: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in data.items())
    return text if len(text) < 90 else text[:87] + "..."


def happy_order(app: WorkflowRuns, order: str) -> uuid.UUID:
    started = app.start_run(c.StartRun(workflow="fulfil_order", input={"order": order}, key=order))
    again = app.start_run(c.StartRun(workflow="fulfil_order", input={"order": order}, key=order))
    assert again.run_id == started.run_id and not again.created  # same key, same run
    run = started.run_id
    app.start_step(c.StartStep(run_id=run, step="charge", attempt=1))
    error = c.StepError(type="GatewayTimeout", message="the card gateway did not answer")
    app.fail_step(c.FailStep(run_id=run, step="charge", attempt=1, error=error))
    app.start_step(c.StartStep(run_id=run, step="charge", attempt=2))
    charge = {"charge_id": "ch_42", "amount": 1999}
    app.complete_step(
        c.CompleteStep(run_id=run, step="charge", attempt=2, output=charge, compensable=True)
    )
    app.start_sleep(c.StartSleep(run_id=run, name="cool-off", seconds=600))
    app.fire_timer(c.FireTimer(run_id=run, name="cool-off"))
    app.start_wait(
        c.StartWait(
            run_id=run,
            name="shipped",
            event_name="shipment.confirmed",
            match={"order": order},
            timeout_seconds=3 * 86400,
        )
    )
    shipped = app.send_event(
        c.SendEvent(name="shipment.confirmed", data={"order": order, "carrier": "ups"})
    )
    app.deliver_event(c.DeliverEvent(run_id=run, name="shipped", event_id=shipped.event_id))
    app.complete_run(c.CompleteRun(run_id=run, output={"charge": charge, "carrier": "ups"}))
    return run


def failing_order(app: WorkflowRuns, order: str) -> uuid.UUID:
    run = app.start_run(c.StartRun(workflow="fulfil_order", input={"order": order})).run_id
    for name, output in (("charge", {"charge_id": "ch_43"}), ("reserve", {"slot": 7})):
        app.start_step(c.StartStep(run_id=run, step=name, attempt=1))
        app.complete_step(
            c.CompleteStep(run_id=run, step=name, attempt=1, output=output, compensable=True)
        )
    app.start_step(c.StartStep(run_id=run, step="ship", attempt=1))
    error = c.StepError(type="AddressInvalid", message="no such street")
    app.fail_step(c.FailStep(run_id=run, step="ship", attempt=1, error=error))
    app.fail_run(c.FailRun(run_id=run, error=error))
    for name in app.get_run(run).compensations_pending():  # latest first
        app.compensate_step(c.CompensateStep(run_id=run, step=name))
    return run


def main() -> None:
    settings = Settings()
    app = bootstrap(settings)
    try:
        policy = RetryPolicy(
            max_attempts=5, initial_interval=1, non_retryable_error_types=("AddressInvalid",)
        )
        app.register_workflow(
            c.RegisterWorkflow(name="fulfil_order", triggers=["order.placed"], retry_policy=policy)
        )
        order = f"order-{uuid.uuid4().hex[:6]}"
        ok = happy_order(app, order)
        bad = failing_order(app, f"{order}-b")
        history(app, ok, f"run {ok}: {app.get_run(ok).status}")
        history(app, bad, f"run {bad}: {app.get_run(bad).status}")
        console.print(
            f"[green]ok[/]: both runs are in the event store at {settings.database_url} "
            f"(head position {app.recorder.max_notification_id()})"
        )
    finally:
        app.close()


if __name__ == "__main__":
    main()
