"""Which events the relay may hold back for a few ms: those of runs started eagerly."""

from __future__ import annotations

from uuid import UUID

from infrastructure.nats.relay import EAGER_RUNS_KEPT, _EagerRuns
from projections.records import EventRecord
from tests.support.records import record

EAGER_RUN = UUID("00000000-0000-0000-0000-0000000000e1")
QUEUED_RUN = UUID("00000000-0000-0000-0000-0000000000a1")


def started(run: UUID, reason: str) -> list[EventRecord]:
    return [record("RunStarted", run), record("TaskDispatched", run, reason=reason)]


def test_an_eager_runs_events_may_wait_and_any_other_runs_may_not() -> None:
    runs = _EagerRuns()
    assert runs.only(started(EAGER_RUN, "eager"))
    assert runs.only([record("StepStarted", EAGER_RUN), record("StepCompleted", EAGER_RUN)])
    assert not runs.only(started(QUEUED_RUN, "start"))  # a worker waits for its task
    assert not runs.only([record("StepStarted", EAGER_RUN), record("StepStarted", QUEUED_RUN)])
    assert runs.only([record("RunCompleted", EAGER_RUN)])  # its starter has the end
    assert not runs.only([record("StepStarted", EAGER_RUN)])  # ended: forgotten


def test_a_run_handed_to_its_queue_after_an_eager_start_is_published_at_once() -> None:
    runs = _EagerRuns()
    runs.only(started(EAGER_RUN, "eager"))
    assert not runs.only([record("TaskDispatched", EAGER_RUN, reason="eager_expired")])
    assert not runs.only([record("StepStarted", EAGER_RUN)])


def test_the_relay_remembers_a_bounded_number_of_eager_runs() -> None:
    runs = _EagerRuns()
    for n in range(EAGER_RUNS_KEPT + 1):
        runs.only(started(UUID(int=n + 1), "eager"))
    assert not runs.only([record("StepStarted", UUID(int=1))])  # the oldest, forgotten
    assert runs.only([record("StepStarted", UUID(int=EAGER_RUNS_KEPT + 1))])
