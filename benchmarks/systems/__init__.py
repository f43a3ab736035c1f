"""The systems under test, by name. Modules are imported on demand (see System)."""

from __future__ import annotations

import importlib

from .base import JobFn, System, Venv

#: name -> "module:class". A peer adds a line here and its adapter module.
SYSTEMS = {
    "minimal": "benchmarks.systems.minimal:MinimalSystem",
    "taskq": "benchmarks.systems.taskq_system:TaskqSystem",
    "pgqueuer": "benchmarks.systems.pgqueuer_system:PgqueuerSystem",
    "procrastinate": "benchmarks.systems.procrastinate_system:ProcrastinateSystem",
}


def load(name: str) -> type[System]:
    module, _, cls = SYSTEMS[name].partition(":")
    system: type[System] = getattr(importlib.import_module(module), cls)
    return system


__all__ = ["SYSTEMS", "JobFn", "System", "Venv", "load"]
