"""A workflow step's arguments, with its parents' results put in place.

A step's arguments are stored with a marker where the builder saw a step
reference (``{"$taskq_ref": "<parent step>"}``, also inside lists and dicts).
When the step is released, Postgres copies the parents' results into the
job's ``inputs`` (by parent step name); the worker puts each result in place
of its markers before decoding the arguments by the task's annotations. A
parent that failed or was cancelled is described instead
(``{"$taskq_failed": {...}}``) and becomes a :class:`StepFailed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The key of a step reference inside stored arguments.
REF_KEY = "$taskq_ref"
#: The key of a failed parent's description inside inputs.
FAILED_KEY = "$taskq_failed"


@dataclass(frozen=True)
class StepFailed:
    """In place of a parent step's result: that parent did not succeed.

    A step added with ``on_parent_failure="run"`` runs once all its parents
    have ended, whatever their outcome; each parent that failed or was
    cancelled is passed as a ``StepFailed`` where its result would be (also
    inside a list, and for the failed items of a map). A task that joins
    partial results checks ``isinstance(part, taskq.StepFailed)``.
    """

    #: The parent step's name in its workflow.
    step: str
    #: ``"failed"`` or ``"cancelled"``.
    state: str
    #: The error type, e.g. ``"ValueError"`` or ``"taskq.JobCancelled"``.
    error_type: str
    #: The error message.
    message: str
    #: The parent step's job id (``app.get_job(job_id)`` tells more).
    job_id: int | None = None

    def __str__(self) -> str:
        return f"step {self.step!r} {self.state}: {self.error_type}: {self.message}"


def step_failed(value: Any) -> StepFailed | None:
    """The StepFailed that ``value`` describes, or None if it is not a failure marker."""
    if isinstance(value, dict) and len(value) == 1 and FAILED_KEY in value:
        info = value[FAILED_KEY]
        if isinstance(info, dict):
            job_id = info.get("job_id")
            return StepFailed(
                step=str(info.get("step", "")),
                state=str(info.get("state", "failed")),
                error_type=str(info.get("type", "")),
                message=str(info.get("message", "")),
                job_id=job_id if isinstance(job_id, int) else None,
            )
    return None


def _result(value: Any) -> Any:
    failed = step_failed(value)
    if failed is not None:
        return failed
    if isinstance(value, list):  # a map's results: its failed items are markers
        return [step_failed(v) or v for v in value]
    return value


def fill_inputs(stored: dict[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``stored`` arguments with every step reference replaced by that step's result."""

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            if len(value) == 1 and REF_KEY in value:
                name = value[REF_KEY]
                if isinstance(name, str) and name in inputs:
                    return _result(inputs[name])
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    return {k: fill(v) for k, v in stored.items()}
