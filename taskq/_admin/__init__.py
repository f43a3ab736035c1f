"""Operator actions behind the command line: status, job listings, bulk retry,
cancel and purge.

- :mod:`.statements`: the SQL, one :class:`AdminStatements` per schema.
- :mod:`.status`: the ``status`` report (counts per queue, live workers).
- :mod:`.jobs`: one job in full, and listings by state, queue and task.
- :mod:`.bulk`: retry, cancel and purge by id or by filter, in batches.
- :mod:`.why`: why a job is not running, by the rules the claim applies.

The async functions take the :class:`taskq._database.Database` they get their
connections from and the schema they act on; they never see the App.
"""

from __future__ import annotations

from .bulk import (
    BATCH_SIZE,
    RETRYABLE_STATES,
    CancelResult,
    Matched,
    Progress,
    RetryResult,
    cancel_ids,
    cancel_matching,
    count_cancel,
    count_purge,
    count_retry,
    purge,
    purge_cutoff,
    retry_ids,
    retry_matching,
)
from .jobs import (
    ALL_STATES,
    FINISHED_STATES,
    LIVE_STATES,
    JobDetail,
    get_job,
    known_tasks,
    list_jobs,
    task_in_history,
)
from .statements import AdminStatements, statements
from .status import QueueStatus, StatusReport, WorkerStatus, status
from .why import Explanation, Reason, why_not_running

__all__ = [
    "ALL_STATES",
    "BATCH_SIZE",
    "FINISHED_STATES",
    "LIVE_STATES",
    "RETRYABLE_STATES",
    "AdminStatements",
    "CancelResult",
    "Explanation",
    "JobDetail",
    "Matched",
    "Progress",
    "QueueStatus",
    "Reason",
    "RetryResult",
    "StatusReport",
    "WorkerStatus",
    "cancel_ids",
    "cancel_matching",
    "count_cancel",
    "count_purge",
    "count_retry",
    "get_job",
    "known_tasks",
    "list_jobs",
    "purge",
    "purge_cutoff",
    "retry_ids",
    "retry_matching",
    "statements",
    "status",
    "task_in_history",
    "why_not_running",
]
