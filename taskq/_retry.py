"""Retry policies: how often a failing job runs again, and after how long."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import tenacity
from tenacity.wait import wait_base

from ._errors import ConfigurationError

#: Total runs of a job (first run included) under the default policy. A few
#: tries ride out a flaky dependency; more than that usually hides a bug that a
#: dead letter shows sooner.
DEFAULT_ATTEMPTS = 5
#: First retry after 10-15 s, then x3 each time (10, 30, 90, 270 s plus jitter),
#: capped at one hour. Jitter keeps a burst of failures from retrying in lockstep.
DEFAULT_WAIT: wait_base = tenacity.wait_exponential(
    multiplier=10, exp_base=3, max=3600
) + tenacity.wait_random(0, 5)

RetryPredicate = Callable[[tenacity.RetryCallState], bool]
WaitStrategy = Callable[[tenacity.RetryCallState], float]


def _default_wait() -> WaitStrategy:
    return DEFAULT_WAIT


@dataclass(frozen=True)
class Retry:
    """A retry policy for a task.

    Args:
        attempts: total runs of a job, the first one included (``1`` = never retry).
            Default :data:`DEFAULT_ATTEMPTS` (5).
        wait: a tenacity wait strategy (``tenacity.wait_fixed(30)``,
            ``wait_exponential(...)``, sums of them...), or a number of seconds.
            It gets the attempt number that just failed. Default: exponential
            from 10 s with jitter, capped at one hour.
        on: which failures are retried: an exception class, a tuple of them, or a
            tenacity retry predicate such as ``tenacity.retry_if_exception(...)``.
            Default: every ``Exception``. Timeouts count as ``TimeoutError``.

    A retry is durable: the job goes back to the queue with a later ``run_at``,
    so it survives a worker restart.
    """

    attempts: int = DEFAULT_ATTEMPTS
    wait: WaitStrategy | float | int = field(default_factory=_default_wait)
    on: type[BaseException] | tuple[type[BaseException], ...] | RetryPredicate = Exception

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool):
            raise ConfigurationError(f"Retry(attempts=...) must be an int, got {self.attempts!r}")
        if self.attempts < 1:
            raise ConfigurationError(
                f"Retry(attempts={self.attempts}) must be at least 1 (1 means: never retry)"
            )
        if isinstance(self.wait, bool) or not (
            callable(self.wait) or isinstance(self.wait, int | float)
        ):
            raise ConfigurationError(
                f"Retry(wait=...) must be a tenacity wait strategy or seconds, got {self.wait!r}"
            )
        if isinstance(self.wait, int | float) and self.wait < 0:
            raise ConfigurationError(f"Retry(wait={self.wait}) must not be negative")
        on = self.on
        ok = (
            (inspect.isclass(on) and issubclass(on, BaseException))
            or (
                isinstance(on, tuple)
                and all(inspect.isclass(t) and issubclass(t, BaseException) for t in on)
            )
            or (callable(on) and not inspect.isclass(on))
        )
        if not ok:
            raise ConfigurationError(
                "Retry(on=...) must be an exception class, a tuple of them or a tenacity "
                f"retry predicate, got {on!r}"
            )

    @classmethod
    def never(cls) -> Retry:
        """A policy that runs a job once and never retries it."""
        return cls(attempts=1)

    def should_retry(
        self, exc: BaseException, attempt: int, *, max_attempts: int | None = None
    ) -> bool:
        """Whether a job that raised ``exc`` on run number ``attempt`` runs again.

        ``max_attempts`` overrides ``attempts`` (a job keeps the budget it was
        enqueued with, even if the policy changed since).
        """
        if attempt >= (self.attempts if max_attempts is None else max_attempts):
            return False
        on = self.on
        if inspect.isclass(on) or isinstance(on, tuple):
            return isinstance(exc, on)
        return bool(on(_state(exc, attempt)))

    def delay(self, exc: BaseException, attempt: int) -> float:
        """Seconds to wait before run number ``attempt + 1``."""
        wait = self.wait
        if isinstance(wait, int | float):
            return float(wait)
        return max(0.0, float(wait(_state(exc, attempt))))


def _state(exc: BaseException, attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, exc.__traceback__))
    return state


def coerce_retry(value: Retry | int | bool | None) -> Retry:
    """Turn the ``retry=`` argument of ``@app.task`` into a policy."""
    if value is None or value is True:
        return Retry()
    if value is False:
        return Retry.never()
    if isinstance(value, Retry):
        return value
    if isinstance(value, int):
        return Retry(attempts=value)
    raise ConfigurationError(f"retry= must be a taskq.Retry, an int or a bool, got {value!r}")
