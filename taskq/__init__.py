"""taskq: asyncio-native background jobs on Postgres.

The whole public API is listed in ``__all__``; everything in ``taskq._*``
modules may change without notice.
"""

from ._app import App
from ._cron import CronEntry
from ._errors import (
    ConfigurationError,
    DatabaseError,
    DecodeError,
    JobCancelled,
    JobError,
    JobFailed,
    JobNotFound,
    SchemaError,
    SerializationError,
    TaskqError,
    UnknownTaskError,
    WorkflowCancelled,
    WorkflowError,
    WorkflowFailed,
    WorkflowNotFound,
)
from ._hooks import EnqueueContext, JobContext, JobOutcome
from ._inputs import StepFailed
from ._job import Job, JobState, JobStatus
from ._limits import RateLimit
from ._logging import JsonFormatter
from ._queues import Queue, QueueInfo
from ._retry import Retry
from ._task import BoundTask, Task
from ._version import __version__
from ._workflow import StepRef, Workflow
from ._workflow_run import StepStatus, WorkflowRun, WorkflowState, WorkflowStatus
from .worker import Worker, WorkerConfig, WorkerStats

__all__ = [
    "App",
    "BoundTask",
    "ConfigurationError",
    "CronEntry",
    "DatabaseError",
    "DecodeError",
    "EnqueueContext",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobError",
    "JobFailed",
    "JobNotFound",
    "JobOutcome",
    "JobState",
    "JobStatus",
    "JsonFormatter",
    "Queue",
    "QueueInfo",
    "RateLimit",
    "Retry",
    "SchemaError",
    "SerializationError",
    "StepFailed",
    "StepRef",
    "StepStatus",
    "Task",
    "TaskqError",
    "UnknownTaskError",
    "Worker",
    "WorkerConfig",
    "WorkerStats",
    "Workflow",
    "WorkflowCancelled",
    "WorkflowError",
    "WorkflowFailed",
    "WorkflowNotFound",
    "WorkflowRun",
    "WorkflowState",
    "WorkflowStatus",
    "__version__",
]
