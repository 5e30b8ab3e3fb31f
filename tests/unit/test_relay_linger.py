"""Which events the relay may hold back for a few ms: those of runs started eagerly."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from domain.values import JSON
from infrastructure.nats.relay import EAGER_RUNS_KEPT, _EagerRuns
from projections.records import EventRecord

EAGER_RUN = UUID("00000000-0000-0000-0000-0000000000e1")
QUEUED_RUN = UUID("00000000-0000-0000-0000-0000000000a1")


def record(run: UUID, kind: str, data: dict[str, JSON] | None = None, n: int = 1) -> EventRecord:
    return EventRecord(
        position=n,
        prev_position=n - 1,
        originator_id=run,
        version=n,
        aggregate="WorkflowRun",
        type=kind,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        data=data or {},
    )


def started(run: UUID, reason: str) -> list[EventRecord]:
    return [record(run, "RunStarted"), record(run, "TaskDispatched", {"reason": reason})]


def test_an_eager_runs_events_may_wait_and_any_other_runs_may_not() -> None:
    runs = _EagerRuns()
    assert runs.only(started(EAGER_RUN, "eager"))
    assert runs.only([record(EAGER_RUN, "StepStarted"), record(EAGER_RUN, "StepCompleted")])
    assert not runs.only(started(QUEUED_RUN, "start"))  # a worker waits for its task
    assert not runs.only([record(EAGER_RUN, "StepStarted"), record(QUEUED_RUN, "StepStarted")])
    assert runs.only([record(EAGER_RUN, "RunCompleted")])  # its starter has the end
    assert not runs.only([record(EAGER_RUN, "StepStarted")])  # ended: forgotten


def test_a_run_handed_to_its_queue_after_an_eager_start_is_published_at_once() -> None:
    runs = _EagerRuns()
    runs.only(started(EAGER_RUN, "eager"))
    assert not runs.only([record(EAGER_RUN, "TaskDispatched", {"reason": "eager_expired"})])
    assert not runs.only([record(EAGER_RUN, "StepStarted")])


def test_the_relay_remembers_a_bounded_number_of_eager_runs() -> None:
    runs = _EagerRuns()
    for n in range(EAGER_RUNS_KEPT + 1):
        runs.only(started(UUID(int=n + 1), "eager"))
    assert not runs.only([record(UUID(int=1), "StepStarted")])  # the oldest, forgotten
    assert runs.only([record(UUID(int=EAGER_RUNS_KEPT + 1), "StepStarted")])
