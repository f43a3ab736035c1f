"""``worker --processes N``: a supervisor of child worker processes.

The supervisor never opens the App: each child is a fresh ``python -m taskq
worker`` (its own interpreter, event loop, pool and LISTEN connection), so no
connection or loop crosses a fork. The supervisor:

- restarts a child that exits when nobody asked it to, after a backoff that
  doubles from ``backoff_min`` to ``backoff_max`` and is forgotten once a child
  stayed up ``stable_seconds`` (a child that crashes at start cannot make it
  spin), logging the exit status or signal;
- forwards SIGTERM/SIGINT to every child and waits for them: the first signal
  is each worker's graceful shutdown, the second cancels running jobs, the
  third ends the children at once (see the worker's own signal handling);
- puts the children in their own process group, so that a Ctrl-C in a
  terminal reaches them once (through the supervisor) rather than twice;
- on Linux, asks the kernel to send each child SIGTERM if the supervisor
  dies (SIGKILL), so a lost supervisor leaves no workers behind.

Scaling by load (``--autoscale``) lives in :mod:`.autoscale` and drives
:meth:`Supervisor.grow` / :meth:`Supervisor.shrink`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from ..worker.worker import SUPERVISED_ENV

log = logging.getLogger("taskq.supervisor")

#: Set in each child: its slot (0, 1, ...; a restarted child keeps its slot).
WORKER_INDEX_ENV = "TASKQ_WORKER_INDEX"
#: Set in each child: the supervisor's pid.
SUPERVISOR_PID_ENV = "TASKQ_SUPERVISOR_PID"

#: Environment variable holding ``name=seconds,...`` overrides of
#: :class:`Timings` (tests shorten them; operators rarely need to).
TIMINGS_ENV = "TASKQ_SUPERVISOR_TIMINGS"
#: First wait before a child that died is started again.
RESTART_BACKOFF_MIN_SECONDS = 1.0
#: The wait doubles up to this.
RESTART_BACKOFF_MAX_SECONDS = 30.0
#: A child that stayed up this long resets its slot's backoff.
RESTART_STABLE_SECONDS = 60.0
#: How often the supervisor looks at its children (a ``waitpid`` each).
TICK_SECONDS = 0.05
#: Linux ``prctl`` option: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1


@dataclass
class Timings:
    """The supervisor's and the autoscaler's clocks, in seconds."""

    backoff_min: float = RESTART_BACKOFF_MIN_SECONDS
    backoff_max: float = RESTART_BACKOFF_MAX_SECONDS
    stable_seconds: float = RESTART_STABLE_SECONDS
    # Autoscaling (see .autoscale for what each one means).
    check_seconds: float = 2.0
    lag_seconds: float = 5.0
    grow_checks: float = 2
    grow_seconds: float = 5.0
    quiet_seconds: float = 60.0
    shrink_seconds: float = 30.0
    idle_cpu: float = 0.2

    @classmethod
    def from_env(cls) -> Timings:
        """Defaults, with ``$TASKQ_SUPERVISOR_TIMINGS`` (``name=seconds,...``) applied."""
        timings = cls()
        names = {f.name for f in fields(cls)}
        for item in filter(None, os.environ.get(TIMINGS_ENV, "").split(",")):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in names:
                raise ValueError(f"${TIMINGS_ENV}: unknown {name!r} (known: {sorted(names)})")
            setattr(timings, name, float(value))
        return timings


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGTERM the child when ``parent`` dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return arm


def describe_exit(status: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


@dataclass
class Child:
    """One slot of the supervisor: its process now, and its restart state."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # monotonic
    backoff: float = 0.0  # the next restart's wait; 0 = none yet
    restart_at: float | None = None  # monotonic; None = not waiting to restart
    draining: bool = False  # told to stop by the supervisor (a shrink): not restarted
    signals: int = 0  # stop signals sent to this process

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


class Supervisor:
    """Runs ``count`` children made by ``command(index)``; see the module docstring."""

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        count: int,
        *,
        env: dict[str, str] | None = None,
        timings: Timings | None = None,
    ) -> None:
        self.command = command
        self.timings = timings or Timings.from_env()
        self.children: dict[int, Child] = {}
        self._initial = count
        self._env = dict(os.environ if env is None else env)
        self._signals = 0
        self._failed: list[str] = []  # children that did not stop cleanly

    @property
    def stopping(self) -> bool:
        """A stop signal arrived: no restarts, no scaling, wait for the children."""
        return self._signals > 0

    @property
    def size(self) -> int:
        """Slots that are not draining (running, or waiting to restart)."""
        return sum(1 for c in self.children.values() if not c.draining)

    # -- children ------------------------------------------------------------------

    def _start(self, child: Child) -> None:
        env = dict(self._env)
        env[WORKER_INDEX_ENV] = str(child.index)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        env[SUPERVISED_ENV] = f"{os.getpid()}/{child.index}"
        child.proc = subprocess.Popen(
            list(self.command(child.index)),
            env=env,
            # Own process group: a terminal's Ctrl-C reaches the supervisor,
            # which forwards it once; otherwise each child would get it twice
            # (from the terminal and from us) and the second means "force".
            process_group=0,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        child.started = time.monotonic()
        child.restart_at = None
        child.signals = 0
        log.info("started worker child %d (pid %d)", child.index, child.proc.pid)

    def grow(self, reason: str) -> Child:
        """Start one more child, in the lowest free slot."""
        index = next(i for i in range(len(self.children) + 1) if i not in self.children)
        child = self.children[index] = Child(index)
        log.info("autoscale: starting worker child %d (%s)", index, reason)
        self._start(child)
        return child

    def shrink(self, reason: str) -> Child | None:
        """Drain the child in the highest slot: SIGTERM = stop claiming, finish, exit.

        Never SIGKILL: the child finishes its running jobs (up to its shutdown
        timeout) before it exits. Returns it, or None when there is none to drain.
        """
        live = [c for c in self.children.values() if not c.draining]
        if not live:
            return None
        child = max(live, key=lambda c: c.index)
        child.draining = True
        if child.alive:
            assert child.proc is not None
            log.info(
                "autoscale: draining worker child %d (pid %d): %s", child.index, child.pid, reason
            )
            child.proc.send_signal(signal.SIGTERM)
            child.signals = 1
        else:  # waiting to restart: just forget the slot
            del self.children[child.index]
        return child

    @property
    def draining(self) -> bool:
        """A drained child has not exited yet."""
        return any(c.draining for c in self.children.values())

    def _reap(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.proc is None or child.restart_at is not None:
                continue
            status = child.proc.poll()
            if status is None:
                continue
            up = now - child.started
            what = f"worker child {child.index} (pid {child.proc.pid}) {describe_exit(status)}"
            if self.stopping or child.draining:
                # Killed by the very signal it was sent: it had not installed
                # its handlers yet (still starting), so it held no job.
                clean = status == 0 or -status in (signal.SIGTERM, signal.SIGINT)
                (log.info if clean else log.warning)("%s after %.1f s", what, up)
                if not clean and self.stopping:
                    self._failed.append(what)
                del self.children[child.index]
                continue
            t = self.timings
            if up >= t.stable_seconds or not child.backoff:
                child.backoff = t.backoff_min
            else:
                child.backoff = min(child.backoff * 2, t.backoff_max)
            child.restart_at = now + child.backoff
            log.warning(
                "%s after %.1f s, unexpectedly; restarting it in %.1f s",
                what,
                up,
                child.backoff,
            )

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.restart_at is not None and now >= child.restart_at:
                self._start(child)

    # -- signals -------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        sent = 0
        for child in self.children.values():
            # A child draining for a shrink already has its first signal: the
            # stop's first must not be its second ("cancel your jobs").
            if child.alive and child.signals < self._signals:
                assert child.proc is not None
                child.proc.send_signal(signum)
                child.signals += 1
                sent += 1
        what = (
            "stopping: each child stops claiming and gets its shutdown timeout"
            if self._signals == 1
            else "forcing: each child cancels its running jobs"
            if self._signals == 2
            else "children exit at once"
        )
        log.warning(
            "%s received (%d): %s; forwarded to %d worker child(ren)%s",
            name,
            self._signals,
            what,
            sent,
            "; send it again to force" if self._signals == 1 else "",
        )
        # Slots waiting to restart will not be.
        for child in [c for c in self.children.values() if c.restart_at is not None]:
            del self.children[child.index]

    # -- main loop -----------------------------------------------------------------

    async def run(self, tick: Callable[[], object] | None = None) -> int:
        """Start the children and supervise them until a stop signal; the exit status.

        ``tick`` (the autoscaler) is called about every :data:`TICK_SECONDS`
        while not stopping; it may be a coroutine function.
        """
        loop = asyncio.get_running_loop()
        stops = (signal.SIGTERM, signal.SIGINT)
        for sig in stops:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            for index in range(self._initial):
                self.children[index] = Child(index)
                self._start(self.children[index])
            while True:
                self._reap()
                if self.stopping:
                    if not self.children:
                        break
                else:
                    self._restart_due()
                    if tick is not None:
                        result = tick()
                        if asyncio.iscoroutine(result):
                            await result
                await asyncio.sleep(TICK_SECONDS)
        finally:
            for sig in stops:
                loop.remove_signal_handler(sig)
            # Only reached with live children on an error in the loop itself.
            for child in self.children.values():
                if child.alive:
                    assert child.proc is not None
                    child.proc.send_signal(signal.SIGTERM)
        if self._failed:
            log.error("supervisor stopped; not stopped cleanly: %s", "; ".join(self._failed))
            return 1
        log.info("supervisor stopped: every worker child exited cleanly")
        return 0
