"""`python -m taskq worker` in a real process, for tests that signal or kill it."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .conftest import PYTHON, subprocess_env


class WorkerProcess:
    """A worker process of ``app`` (``module:app``), its output kept in a file."""

    def __init__(
        self, dsn: str, schema: str, app: str, log: Path, *options: str, **env: str
    ) -> None:
        self.log = log
        self.out = log.open("w")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "taskq", "worker", app, *options],
            env=subprocess_env(dsn, TASKQ_SCHEMA=schema, **env),
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited before printing {text!r}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.text()}")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not stop; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode
