"""Helpers for testing code that uses taskq, against a real Postgres.

Your App runs on a throwaway schema of the test database, created, migrated
and dropped around each test; your tests look at the jobs your code enqueued
and run them, one chosen job at a time or all of them::

    isolated_app(app, dsn=None)          the App on a fresh schema; restored after
    resolve_dsn(dsn=None)                which Postgres tests use ($TASKQ_TEST_DSN, ...)
    enqueued_jobs(task=None, queue=...)  the queued jobs, oldest first
    assert_enqueued(task, **args)        a queued job with these arguments exists
    assert_not_enqueued(task, **args)    none does
    run_job(job)                         claim and run that one job now, as a worker would
    drain(app)                           run every due job, like app.drain()

The pytest plugin (``taskq.testing.pytest_plugin``, loaded automatically
when taskq is installed) gives the ``taskq_app`` fixture: the App named by the
``taskq_app`` ini option, open on a throwaway schema. This module does not
import pytest.
"""

from ._helpers import assert_enqueued, assert_not_enqueued, drain, enqueued_jobs, run_job
from ._isolation import (
    SCHEMA_PREFIX,
    TEST_DSN_ENV,
    current_app,
    isolated_app,
    resolve_dsn,
)

__all__ = [
    "SCHEMA_PREFIX",
    "TEST_DSN_ENV",
    "assert_enqueued",
    "assert_not_enqueued",
    "current_app",
    "drain",
    "enqueued_jobs",
    "isolated_app",
    "resolve_dsn",
    "run_job",
]
