"""taskq's benchmark suite: ``python -m benchmarks`` (see ``__main__`` and runner)."""
