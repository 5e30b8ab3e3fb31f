"""Flow: the registry of a service's workflows, filled by the ``@flow.workflow`` decorator."""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import typing
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from domain.values import Concurrency, RetryPolicy, Timeouts

if TYPE_CHECKING:
    from ledgerflow.context import RunContext

WorkflowFn = Callable[["RunContext", Any], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

WORKFLOW_NAME_ATTRIBUTE = "__ledgerflow_workflow__"


@dataclass(frozen=True)
class Workflow:
    """A registered workflow: its function and the definition sent by ``register_workflow``."""

    name: str
    fn: WorkflowFn
    triggers: list[str] = field(default_factory=list)
    retry: RetryPolicy | None = None
    timeout: timedelta | None = None
    concurrency: Concurrency | None = None
    queue: str = "default"
    step_timeout: timedelta | None = None
    """Each step attempt's default time limit (a step's own ``timeout`` overrides it)."""

    @functools.cached_property
    def takes_input(self) -> bool:
        """Whether the function has a parameter for the run's input, after the context."""
        return len(inspect.signature(self.fn).parameters) >= 2

    @functools.cached_property
    def input_type(self) -> Any:
        """The annotation of the function's second parameter (``Any`` when there is none)."""
        params = list(inspect.signature(self.fn).parameters)
        if len(params) < 2:
            return Any
        return type_hints(self.fn).get(params[1], Any)

    @functools.cached_property
    def output_type(self) -> Any:
        return type_hints(self.fn).get("return", Any)

    def registration(self, worker_id: str | None = None) -> dict[str, Any]:
        """The body of the ``register_workflow`` command."""
        body: dict[str, Any] = {"name": self.name, "triggers": self.triggers, "queue": self.queue}
        if self.retry is not None:
            body["retry_policy"] = self.retry.to_json()
        if self.timeout is not None or self.step_timeout is not None:
            body["timeouts"] = Timeouts(
                run=_seconds(self.timeout), step=_seconds(self.step_timeout)
            ).to_json()
        if self.concurrency is not None:
            body["concurrency"] = self.concurrency.to_json()
        if worker_id is not None:
            body["worker_id"] = worker_id
        return body


class Flow:
    """A named set of workflows that one worker process serves."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._workflows: dict[str, Workflow] = {}

    def workflow(
        self,
        name: str | None = None,
        *,
        triggers: list[str] | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | None = None,
        concurrency: int | Concurrency | None = None,
        queue: str | None = None,
        step_timeout: timedelta | None = None,
    ) -> Callable[[F], F]:
        """Register ``async def wf(ctx: RunContext, input: T) -> R`` under ``name``.

        Runs go to the task queue ``queue``, by default the flow's name: the workers of a
        flow get its tasks only, never another flow's that they could not run.

        ``timeout`` limits the whole run; ``step_timeout`` each step attempt that sets no
        ``timeout`` of its own (see ``RunContext.step``).
        """

        def register(fn: F) -> F:
            is_async = inspect.iscoroutinefunction(fn)
            if not is_async:
                raise TypeError(f"workflow {fn.__name__} must be an async function")
            wf_name = name or fn.__name__
            if wf_name in self._workflows:
                raise ValueError(f"workflow {wf_name!r} is registered twice in flow {self.name}")
            limit = Concurrency(limit=concurrency) if isinstance(concurrency, int) else concurrency
            self._workflows[wf_name] = Workflow(
                wf_name,
                fn,
                list(triggers or []),
                retry,
                timeout,
                limit,
                queue or self.name,
                step_timeout,
            )
            setattr(fn, WORKFLOW_NAME_ATTRIBUTE, wf_name)
            return fn

        return register

    def get(self, name: str) -> Workflow | None:
        return self._workflows.get(name)

    def __getitem__(self, name: str) -> Workflow:
        return self._workflows[name]

    def __iter__(self) -> Iterator[Workflow]:
        return iter(self._workflows.values())

    def __len__(self) -> int:
        return len(self._workflows)

    @property
    def queues(self) -> list[str]:
        return sorted({w.queue for w in self._workflows.values()})


def _seconds(limit: timedelta | None) -> float | None:
    return None if limit is None else limit.total_seconds()


def workflow_name(workflow: str | Callable[..., Any]) -> str:
    """A workflow's name, from the name itself or from a function ``@flow.workflow`` took."""
    if isinstance(workflow, str):
        return workflow
    name = getattr(workflow, WORKFLOW_NAME_ATTRIBUTE, None)
    if not isinstance(name, str):
        raise TypeError(f"{workflow!r} is not a registered workflow")
    return name


_HINTS: weakref.WeakKeyDictionary[Any, Mapping[str, Any]] = weakref.WeakKeyDictionary()


def type_hints(fn: Callable[..., Any]) -> Mapping[str, Any]:
    """``typing.get_type_hints``, or nothing for callables it cannot read (lambdas, partials).

    Read once per function: every task replays its workflow's steps, and reading the hints
    (``eval`` of each annotation) cost more than recording a trivial step.
    """
    key = getattr(fn, "__func__", fn)  # a bound method has its function's hints
    with contextlib.suppress(KeyError, TypeError):  # TypeError: not weakly referenceable
        return _HINTS[key]
    try:
        hints: Mapping[str, Any] = types.MappingProxyType(typing.get_type_hints(fn))
    except Exception:
        return {}  # not kept: a name the annotations need may be defined later
    with contextlib.suppress(TypeError):
        _HINTS[key] = hints
    return hints


def load_flow(target: str) -> Flow:
    """The Flow that ``MODULE:ATTRIBUTE`` names (``MODULE`` alone means ``MODULE:flow``);
    ValueError saying what is wrong when it names none."""
    import importlib

    module_name, _, attribute = target.partition(":")
    if not module_name:
        raise ValueError(f"{target!r} is not MODULE:FLOW")
    try:
        found = getattr(importlib.import_module(module_name), attribute or "flow")
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {target}: {e}") from e
    if not isinstance(found, Flow):
        raise ValueError(f"{target} is not a ledgerflow Flow")
    return found
