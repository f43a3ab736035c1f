"""The worker package: claims jobs, runs each in its own task, writes outcomes back in batches."""

# One worker per process is the usual shape, but several may share an App. The
# life of a job inside a worker:
#
#   claim (one statement, up to the free slots, FOR UPDATE SKIP LOCKED, lease)  worker.py
#     -> run in its own task (timeout, user cancel, shutdown cancel it alone)   runner.py
#     -> outcome buffered -> written back with others in one statement          writeback.py
#
# Beside the claim loop run the services, each built with what it needs and
# started the same way (``run()`` in the worker's task group): the write-back,
# the lease keeper (with the rescuer in its round) and the lease watchdog
# (leases.py), the history pruner (upkeep.py), and the cron scheduler.

from .config import DEFAULT_CONCURRENCY, WorkerConfig, WorkerHost, WorkerStats
from .worker import Worker

__all__ = ["DEFAULT_CONCURRENCY", "Worker", "WorkerConfig", "WorkerHost", "WorkerStats"]
