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
)
from ._hooks import EnqueueContext, JobContext, JobOutcome
from ._job import Job, JobState, JobStatus
from ._limits import RateLimit
from ._logging import JsonFormatter
from ._queues import Queue, QueueInfo
from ._retry import Retry
from ._task import BoundTask, Task
from ._version import __version__
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
    "Task",
    "TaskqError",
    "UnknownTaskError",
    "Worker",
    "WorkerConfig",
    "WorkerStats",
    "__version__",
]
