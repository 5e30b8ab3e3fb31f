"""The event log's plain read path makes exactly the records of eventsourcing's own path."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.persistence import MapperDeserialisationError, Notification
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.workflow_run import WorkflowRun
from infrastructure.bootstrap import bootstrap
from infrastructure.codec import may_hold_big_ints
from infrastructure.event_log import plain_record_of
from infrastructure.settings import Settings
from infrastructure.telemetry.stamping import stamping
from projections.records import record_of
from services.workflow_runs import WorkflowRuns

APP: WorkflowRuns = bootstrap(Settings(database_url="memory://"))

zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=3))]
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: only eventsourcing's path reads those
    | st.floats(allow_nan=False)  # infinities too (stored as the non-JSON "Infinity")
    | st.text()
    | st.uuids()
    | st.datetimes(timezones=zones)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=6) | st.sampled_from(["_type_", "_data_"]), inner, max_size=4
        )
    ),
    max_leaves=24,
)


def both(event: Any, traceparent: str | None) -> tuple[Any, Any]:
    with stamping({event.originator_id: traceparent} if traceparent else {}):
        stored = APP.mapper.to_stored_event(event)
    notification = Notification(
        id=41,
        originator_id=stored.originator_id,
        originator_version=stored.originator_version,
        topic=stored.topic,
        state=stored.state,
    )
    ours = plain_record_of(
        41, stored.originator_id, stored.originator_version, stored.topic, stored.state, 40
    )
    if ours is None:
        assert may_hold_big_ints(stored.state) or _unplain(event.output)
    try:
        theirs = record_of(APP.mapper.to_domain_event(notification), 41, 40)
    except MapperDeserialisationError:
        # eventsourcing cannot read a value shaped like its own encoding of an unknown
        # type (a user's {"_type_": ..., "_data_": ...}): nor does the plain path.
        theirs = None
    return ours, theirs


@settings(max_examples=300, deadline=None)
@given(
    output=values,
    step=st.text(),
    attempt=st.integers(min_value=1, max_value=2**31),
    traceparent=st.none() | st.just("00-0b5c6f4e8a834d8e9b0a3f7f2c1d9e11-00000000000000aa-01"),
)
def test_a_stored_event_reads_the_same_by_either_path(
    output: Any, step: str, attempt: int, traceparent: str | None
) -> None:
    event = WorkflowRun.StepCompleted(  # type: ignore[call-arg]
        originator_id=uuid4(),
        originator_version=3,
        timestamp=datetime.now(UTC),
        step=step,
        attempt=attempt,
        output=output,
        compensable=False,
    )
    ours, theirs = both(event, traceparent)
    if theirs is None:
        assert ours is None
        return
    if ours is None:  # left to eventsourcing (checked in both)
        return
    assert ours == theirs
    assert ours.traceparent == theirs.traceparent == traceparent
    assert type(ours.originator_id) is UUID


def test_an_event_stored_at_an_older_class_version_goes_through_its_upcaster() -> None:
    event = WorkflowRun.StepFailed(  # type: ignore[call-arg]
        originator_id=uuid4(),
        originator_version=2,
        timestamp=datetime.now(UTC),
        step="charge",
        attempt=1,
        error={"type": "E", "message": "m"},
    )
    stored = APP.mapper.to_stored_event(event)
    old = stored.state.replace(b'"class_version":2', b'"class_version":1')
    assert old != stored.state
    assert plain_record_of(7, event.originator_id, 2, stored.topic, old, 6) is None


def _unplain(value: Any) -> bool:
    """Values the plain path leaves to eventsourcing: huge ints, infinities, and dicts that
    look like eventsourcing's own encoding of a typed value."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, float):
        return math.isinf(value)
    if isinstance(value, list):
        return any(_unplain(v) for v in value)
    if isinstance(value, dict):
        return set(value) == {"_type_", "_data_"} or any(_unplain(v) for v in value.values())
    return False
