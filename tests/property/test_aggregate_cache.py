"""Random batches through a caching service, another writer and failing saves: what a
command sees through the cache is always exactly the store's state."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from typing import Any

import pytest
from eventsourcing.persistence import OperationalError
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from domain.ids import run_id_for
from infrastructure.bootstrap import bootstrap
from infrastructure.settings import Settings
from services import commands as c
from services.snapshots import snapshot_of
from services.workflow_runs import RunLoaded

RUNS = [run_id_for("orders", key) for key in ("a", "b")]
STEPS = st.sampled_from(["charge", "ship"])
ATTEMPTS = st.integers(min_value=1, max_value=3)
RUN = st.sampled_from(RUNS)

COMMANDS = st.one_of(
    st.builds(c.StartStep, run_id=RUN, step=STEPS, attempt=ATTEMPTS),
    st.builds(c.CompleteStep, run_id=RUN, step=STEPS, attempt=ATTEMPTS, output=st.integers(0, 9)),
    st.builds(
        c.FailStep,
        run_id=RUN,
        step=STEPS,
        attempt=ATTEMPTS,
        error=st.just(c.StepError(type="Transient", message="boom")),
        retryable=st.booleans(),
    ),
    st.builds(c.CancelRun, run_id=RUN),
    st.builds(c.RetryRun, run_id=RUN),
    st.builds(c.CompleteRun, run_id=RUN, output=st.integers(0, 9)),
    st.builds(c.FailRun, run_id=RUN, error=st.just(c.StepError(type="Bad", message="x"))),
    st.builds(c.DispatchRun, run_id=RUN, reason=st.just("start"), cause=st.integers(1, 10**6)),
    st.builds(c.LoadRun, run_id=RUN),
)


class CachedServiceMachine(RuleBasedStateMachine):
    """Two service instances on one store: ``cached`` (whose cache is under test) and
    ``other``, which writes behind its back."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="cache-machine-")
        store = Settings(database_url=f"sqlite:///{self.directory}/store.db")
        self.cached = bootstrap(store, create_tables=True)
        self.other = bootstrap(store)
        self.cached.register_workflow(c.RegisterWorkflow(name="orders"))
        for key in ("a", "b"):
            self.cached.start_run(c.StartRun(workflow="orders", key=key))

    def teardown(self) -> None:
        self.cached.close()
        self.other.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(batch=st.lists(COMMANDS, min_size=1, max_size=6))
    def batch_on_the_cached_instance(self, batch: list[c.Command]) -> None:
        self.cached.execute(batch)

    @rule(batch=st.lists(COMMANDS, min_size=1, max_size=3))
    def batch_on_the_other_instance(self, batch: list[c.Command]) -> None:
        self.other.execute(batch)

    @rule(batch=st.lists(COMMANDS, min_size=1, max_size=4))
    def batch_whose_save_fails(self, batch: list[c.Command]) -> None:
        recorder = self.cached.recorder

        def down(*args: Any, **kwargs: Any) -> None:
            raise OperationalError("the store went away")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(recorder, "insert_events", down)
            # The batch is lost, as the service would answer `unavailable`.
            with contextlib.suppress(OperationalError):
                self.cached.execute(batch)

    @invariant()
    def the_cached_instance_decides_on_the_stored_state(self) -> None:
        for run_id in RUNS:
            reply = self.cached.handle(c.LoadRun(run_id=run_id))
            assert isinstance(reply, RunLoaded)
            assert reply.run == snapshot_of(self.other.get_run(run_id))


CachedServiceMachine.TestCase.settings = settings(settings.default, stateful_step_count=25)
TestCachedService = CachedServiceMachine.TestCase
