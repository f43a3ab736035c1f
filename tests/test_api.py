"""The public surface: names, exception tree, settings validation."""

from __future__ import annotations

import itertools
import types

import pytest
import tenacity

import taskq

from .conftest import ROOT


def test_public_names_are_exactly_all() -> None:
    # Subpackages (taskq.contrib) appear as attributes once imported; they are
    # imported by name, not part of the names `import taskq` offers.
    public = {
        name
        for name in dir(taskq)
        if not name.startswith("_") and not isinstance(getattr(taskq, name), types.ModuleType)
    }
    assert public == set(taskq.__all__) - {"__version__"}
    for name in taskq.__all__:
        assert getattr(taskq, name) is not None


def test_every_public_name_is_in_the_api_reference() -> None:
    reference = (ROOT / "docs" / "reference" / "api.md").read_text()
    missing = [
        n for n in taskq.__all__ if n != "__version__" and f"::: taskq.{n}\n" not in reference
    ]
    assert missing == []


def test_every_error_derives_from_taskq_error() -> None:
    errors = [
        taskq.ConfigurationError,
        taskq.SchemaError,
        taskq.SerializationError,
        taskq.UnknownTaskError,
        taskq.JobNotFound,
        taskq.DatabaseError,
        taskq.JobError,
        taskq.JobFailed,
        taskq.JobCancelled,
        taskq.WorkflowNotFound,
        taskq.WorkflowError,
        taskq.WorkflowFailed,
        taskq.WorkflowCancelled,
    ]
    for error in errors:
        assert issubclass(error, taskq.TaskqError)
    assert issubclass(taskq.JobFailed, taskq.JobError)
    assert issubclass(taskq.JobCancelled, taskq.JobError)
    assert issubclass(taskq.SerializationError, TypeError)


@pytest.mark.parametrize("name", ["Taskq", "1abc", "a-b", "x" * 41, "pg_catalog", 'a"b', ""])
def test_bad_schema_names_are_refused(name: str) -> None:
    with pytest.raises(taskq.ConfigurationError, match="schema name"):
        taskq.App("postgresql://x/y", schema=name)


def test_settings_are_validated_when_made() -> None:
    with pytest.raises(taskq.ConfigurationError, match="dsn"):
        taskq.App(123)  # type: ignore[arg-type]
    with pytest.raises(taskq.ConfigurationError, match="pool sizes"):
        taskq.App("postgresql://x/y", pool_min_size=5, pool_max_size=2)
    app = taskq.App("postgresql://x/y")
    with pytest.raises(taskq.ConfigurationError, match="timeout must be positive"):
        app.task(timeout=0)
    with pytest.raises(taskq.ConfigurationError, match="queue name"):
        app.task(queue="")
    with pytest.raises(taskq.ConfigurationError, match="unknown worker setting"):
        taskq.WorkerConfig.make(concurency=3)
    with pytest.raises(taskq.ConfigurationError, match="concurrency must be a positive int"):
        taskq.WorkerConfig.make(concurrency=0)
    with pytest.raises(taskq.ConfigurationError, match="list of names"):
        taskq.WorkerConfig.make(queues="emails")


def test_retry_policy_validation_and_decisions() -> None:
    with pytest.raises(taskq.ConfigurationError, match="at least 1"):
        taskq.Retry(attempts=0)
    with pytest.raises(taskq.ConfigurationError, match="on="):
        taskq.Retry(on="ValueError")  # type: ignore[arg-type]
    policy = taskq.Retry(attempts=3, wait=tenacity.wait_fixed(7), on=(KeyError, ValueError))
    assert policy.should_retry(KeyError(), 1)
    assert policy.should_retry(ValueError(), 2)
    assert not policy.should_retry(ValueError(), 3)  # attempts used up
    assert not policy.should_retry(RuntimeError(), 1)
    assert policy.delay(KeyError(), 1) == 7


def test_default_retry_policy_waits_at_least_10s_growing_and_capped() -> None:
    policy = taskq.Retry()
    assert 3 <= policy.attempts <= 10
    delays = [policy.delay(RuntimeError(), n) for n in range(1, 12)]
    assert delays[0] >= 10
    assert all(b > a for a, b in itertools.pairwise(delays[:6]))
    assert max(delays) <= 3600 + 5
    # Jitter: two policies' first delays differ (with overwhelming probability).
    assert len({policy.delay(RuntimeError(), 1) for _ in range(20)}) > 1
