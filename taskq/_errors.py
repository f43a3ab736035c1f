"""The exception tree of taskq.

Every error taskq raises on purpose derives from :class:`TaskqError`, so one
``except taskq.TaskqError`` catches them all; driver errors never leak as
``asyncpg.*`` from the public API::

    TaskqError
    ├── ConfigurationError        bad setting, bad name, embedded Postgres unavailable
    ├── SchemaError               schema missing, behind this taskq, or its functions differ
    ├── SerializationError        an argument or result is not JSON (also a TypeError)
    │   └── DecodeError           a stored argument or result no longer fits its annotation
    ├── UnknownTaskError          no task registered under that name (also a LookupError)
    ├── JobNotFound               no job with that id (also a LookupError)
    ├── DatabaseError             Postgres unreachable or refused the statement
    └── JobError                  the job did not produce a value
        ├── JobFailed             failed for good (dead letter): error type, message, traceback
        └── JobCancelled          cancelled before it could finish
"""

from __future__ import annotations

from typing import Any


class TaskqError(Exception):
    """Base class of every error raised by taskq."""


class ConfigurationError(TaskqError, ValueError):
    """A setting or a name is invalid; the message says which rule it breaks."""


class SchemaError(TaskqError):
    """The schema is missing, older than this taskq expects, or its functions differ.

    Raised when an App opens with ``auto_migrate=False``; ``python -m taskq migrate``
    brings the schema up to date.
    """


class SerializationError(TaskqError, TypeError):
    """A job argument or a task result cannot be encoded as JSON.

    Attributes:
        path: where the bad value sits, e.g. ``user_id`` or ``items[3].when``.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class DecodeError(SerializationError):
    """A stored argument or result no longer decodes to the type its annotation names.

    For example a dataclass or model that changed between enqueue and run (a
    deploy). The attempt fails with this error; the task's retry policy applies,
    so a job that reaches a worker still running the older code can succeed
    there, and a dead letter can be re-run once the code accepts it again.
    """


class UnknownTaskError(TaskqError, LookupError):
    """No task with that name is registered on this App."""


class JobNotFound(TaskqError, LookupError):
    """No job with that id exists (it may have been pruned from history)."""


class DatabaseError(TaskqError):
    """Postgres could not be reached, or refused a statement taskq sent."""


class JobError(TaskqError):
    """The job did not produce a value.

    Attributes:
        job_id: the id of the job.
    """

    def __init__(self, message: str, *, job_id: int) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobFailed(JobError):
    """The job failed for good: its retries ran out or its error was not retryable.

    Attributes:
        error_type: qualified name of the exception of the last attempt.
        error_message: ``str()`` of that exception.
        traceback: the formatted traceback of the last attempt (may be truncated).
        attempts: how many times the job ran.
    """

    def __init__(
        self,
        *,
        job_id: int,
        error_type: str,
        error_message: str,
        traceback: str,
        attempts: int,
    ) -> None:
        super().__init__(
            f"job {job_id} failed after {attempts} attempt(s): {error_type}: {error_message}",
            job_id=job_id,
        )
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback
        self.attempts = attempts

    @classmethod
    def from_error(cls, job_id: int, error: dict[str, Any] | None, attempts: int) -> JobFailed:
        """Build from a stored error ``{"type", "message", "traceback"}``."""
        error = error or {}
        return cls(
            job_id=job_id,
            error_type=str(error.get("type", "")),
            error_message=str(error.get("message", "")),
            traceback=str(error.get("traceback", "")),
            attempts=attempts,
        )


class JobCancelled(JobError):
    """The job was cancelled before it finished."""


class WorkflowNotFound(TaskqError, LookupError):
    """No workflow with that id (it never existed, or retention pruned it)."""


class WorkflowError(TaskqError):
    """The workflow did not produce its result.

    Attributes:
        workflow_id: the id of the workflow.
        steps: the steps that did not succeed, as ``{"step", "job_id", "state", "type",
            "message"}``.
    """

    def __init__(
        self, message: str, *, workflow_id: int, steps: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.workflow_id = workflow_id
        self.steps = steps or []


class WorkflowFailed(WorkflowError):
    """A step the workflow's result depends on failed or was cancelled."""


class WorkflowCancelled(WorkflowError):
    """The workflow was cancelled (``run.cancel()``)."""


# Every class here is public as ``taskq.<Name>``: say so in ``__module__``, so
# that messages, logs and stored error types name ``taskq.JobFailed``, never
# the private module.
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, TaskqError):
        _cls.__module__ = "taskq"
del _cls
