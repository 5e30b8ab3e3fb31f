"""Value objects: retry policy, timeouts and concurrency limits, with their JSON forms."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from domain.errors import InvalidCommandError, InvalidPolicyError

JSON = Any
"""Any JSON value (dict, list, str, int, float, bool, None) an event may carry."""

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,199}$")
"""Workflow and event names: safe in NATS subjects, URLs and logs."""

MAX_STEP_NAME = 200

MAX_SECONDS = 10 * 366 * 24 * 3600.0
"""The longest interval, sleep or timeout (ten years): due dates stay far from overflow."""


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid workflow/event name, else raise InvalidCommandError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidCommandError(
            f"{kind} name {name!r} must start with a letter or '_' and contain only "
            "letters, digits, '_', '.', '-' (at most 200 characters)"
        )
    return name


MAX_KEY = 500


def check_key(kind: str, key: str | None) -> str | None:
    """Idempotency keys and external ids: absent, or a non-empty string of bounded size."""
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_KEY):
        raise InvalidCommandError(f"{kind} must be a non-empty string of at most {MAX_KEY} chars")
    if key is not None and _has_control(key):
        raise InvalidCommandError(f"{kind} must not contain control characters")
    return key


def _has_control(text: str) -> bool:
    # NUL cannot be stored in PostgreSQL text at all; the rest only garble logs and UIs.
    return any(unicodedata.category(ch) == "Cc" for ch in text)


TRANSCODING_KEYS = frozenset({"_type_", "_data_"})
"""An object with exactly these keys is how the event store marks a custom type."""


def check_storable(value: JSON, where: str = "value") -> JSON:
    """Refuse JSON the event store would not give back as it was given.

    An object shaped like the store's own type marker (``{"_type_": ..., "_data_": ...}``)
    would be decoded into something else, or not at all, when the aggregate loads; NaN
    and infinities are not JSON and PostgreSQL's jsonb cannot hold them.
    """
    stack: list[JSON] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if set(item) == TRANSCODING_KEYS:
                raise InvalidCommandError(
                    f"{where} holds an object with exactly the keys '_type_' and '_data_', "
                    "which the event store reserves"
                )
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidCommandError(f"{where} holds {item}, which is not JSON")
    return value


def check_step_name(kind: str, name: str) -> str:
    """Step, sleep and wait names are free text, but never empty or huge."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_STEP_NAME:
        raise InvalidCommandError(f"{kind} name must be 1..{MAX_STEP_NAME} characters")
    if _has_control(name):
        raise InvalidCommandError(f"{kind} name must not contain control characters")
    return name


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed step attempt is retried: exponential backoff with a cap and jitter.

    ``max_attempts`` counts every attempt, the first included (1 means no retry).
    ``jitter`` is the fraction by which a delay may be randomly shortened or lengthened.
    """

    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff_coefficient: float = 2.0
    max_interval: float = 300.0
    non_retryable_error_types: tuple[str, ...] = field(default_factory=tuple)
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not _count(self.max_attempts) or self.max_attempts > 10_000:
            raise InvalidPolicyError("max_attempts must be an integer from 1 to 10000")
        if not _seconds(self.initial_interval) or self.initial_interval < 0:
            raise InvalidPolicyError(f"initial_interval must be 0..{MAX_SECONDS:.0f} seconds")
        if not _finite(self.backoff_coefficient) or not 1 <= self.backoff_coefficient <= 100:
            raise InvalidPolicyError("backoff_coefficient must be a number from 1 to 100")
        if not _seconds(self.max_interval) or self.max_interval < self.initial_interval:
            raise InvalidPolicyError(
                f"max_interval must be >= initial_interval and at most {MAX_SECONDS:.0f} seconds"
            )
        if not _finite(self.jitter) or not 0 <= self.jitter <= 1:
            raise InvalidPolicyError("jitter must be between 0 and 1")
        object.__setattr__(self, "non_retryable_error_types", tuple(self.non_retryable_error_types))

    def base_delay(self, attempt: int) -> timedelta:
        """The delay before the attempt after failed ``attempt`` (1-based), without jitter."""
        return _at_most(self._base_seconds(attempt))

    def next_delay(self, attempt: int, rand: float = 0.5) -> timedelta:
        """The delay after failed ``attempt``; ``rand`` in [0, 1] picks the jitter.

        The caller draws ``rand`` (the domain stays deterministic and replayable); 0.5 is
        the jitter-free midpoint. The result is never negative and never above the cap.
        """
        if not 0 <= rand <= 1:
            raise InvalidCommandError("rand must be between 0 and 1")
        seconds = self._base_seconds(attempt) * (1 + self.jitter * (2 * rand - 1))
        return _at_most(max(0.0, min(seconds, self.max_interval)))

    def _base_seconds(self, attempt: int) -> float:
        if attempt < 1:
            raise InvalidCommandError("attempt numbers start at 1")
        if self.initial_interval == 0:
            return 0.0
        # Once past the cap, more attempts cannot lower the delay: stop before overflowing.
        exponent = min(attempt - 1, 1024)
        try:
            seconds = self.initial_interval * self.backoff_coefficient**exponent
        except OverflowError:
            seconds = math.inf
        return min(seconds, self.max_interval)

    def is_retryable(self, error_type: str) -> bool:
        return error_type not in self.non_retryable_error_types

    def allows_attempt(self, attempt: int) -> bool:
        return attempt <= self.max_attempts

    def to_json(self) -> dict[str, JSON]:
        data = asdict(self)
        data["non_retryable_error_types"] = list(self.non_retryable_error_types)
        return data

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> RetryPolicy:
        types = tuple(data.get("non_retryable_error_types", ()))
        return _from_json(cls, {**data, "non_retryable_error_types": types})


@dataclass(frozen=True)
class Timeouts:
    """Time limits in seconds; ``None`` means no limit."""

    run: float | None = None
    step: float | None = None
    heartbeat: float | None = None

    def __post_init__(self) -> None:
        for name in ("run", "step", "heartbeat"):
            value = getattr(self, name)
            if value is not None and (not _seconds(value) or value <= 0):
                raise InvalidPolicyError(
                    f"timeout {name} must be above 0 and at most {MAX_SECONDS:.0f} seconds"
                )

    def to_json(self) -> dict[str, JSON]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> Timeouts:
        return _from_json(cls, data)


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` runs of a workflow at once, per value of input field ``key``."""

    limit: int | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and not _count(self.limit):
            raise InvalidPolicyError("concurrency limit must be an integer >= 1")
        if self.key is not None and not isinstance(self.key, str):
            raise InvalidPolicyError("concurrency key must be the name of an input field")
        if self.key is not None and (self.limit is None or not self.key.strip()):
            raise InvalidPolicyError("a concurrency key needs a limit and a non-empty name")

    def to_json(self) -> dict[str, JSON]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> Concurrency:
        return _from_json(cls, data)


V = TypeVar("V")


def _from_json(cls: type[V], data: dict[str, JSON]) -> V:
    try:
        return cls(**data)
    except TypeError as e:  # unknown or missing fields
        raise InvalidPolicyError(f"invalid {cls.__name__}: {e}") from None


def _at_most(seconds: float) -> timedelta:
    """``seconds`` as a timedelta, rounded down (timedelta rounds to nearest otherwise)."""
    return timedelta(microseconds=math.floor(seconds * 1_000_000))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _seconds(value: object) -> bool:
    return _finite(value) and abs(float(value)) <= MAX_SECONDS  # type: ignore[arg-type]


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
