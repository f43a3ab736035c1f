"""Threads for sync tasks: daemon threads, so that a process never waits for one to exit.

A thread cannot be interrupted. When a sync task times out or its job is
cancelled or released, the worker stops waiting for it and the function runs
on until it returns. With anyio's or concurrent.futures' worker threads, the
interpreter joins such a thread at exit: a worker stopped by a second SIGINT
kept its process alive until the function returned (and a third Ctrl-C
printed a ``KeyboardInterrupt`` traceback from ``threading``). These threads
are daemons: the process exits without them, which ends the function with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

#: An idle thread exits after this many seconds without a call.
IDLE_THREAD_SECONDS = 10.0


class ThreadCall:
    """One call of a sync task's function in a thread.

    ``returned`` turns true once the function has returned or raised; until
    then it may still be running, whatever happened to the job.
    """

    __slots__ = ("fn", "returned")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.returned = False


class SyncThreads:
    """Runs sync functions in daemon threads, at most ``limit`` waited for at once."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._lock = threading.Lock()
        self._idle: list[_Thread] = []
        self._busy = 0

    @property
    def busy(self) -> int:
        """Calls whose function has not returned yet (abandoned ones included)."""
        return self._busy

    async def run(self, call: ThreadCall) -> Any:
        """Run ``call`` in a thread and return what it returns.

        Cancelled (a timeout, a cancel, a shutdown), this stops waiting at once
        and frees its slot; the thread runs on until the function returns.
        """
        async with self._slots:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            # The caller's context variables (a tracing span...) reach the function.
            work = (call, contextvars.copy_context(), loop, future)
            with self._lock:
                self._busy += 1
                thread = self._idle.pop() if self._idle else None
            if thread is None:
                thread = _Thread(self)
                thread.start()
            thread.inbox.put(work)
            return await future

    def close(self) -> None:
        """Let idle threads go now (busy ones end when their function returns)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for thread in idle:
            thread.inbox.put(None)

    def _returned(self, thread: _Thread) -> None:
        with self._lock:
            self._busy -= 1
            self._idle.append(thread)

    def _retire(self, thread: _Thread) -> bool:
        """An idle thread timed out: True if it may exit (no call was handed to it)."""
        with self._lock:
            if thread in self._idle:
                self._idle.remove(thread)
                return True
            return False


class _Thread(threading.Thread):
    def __init__(self, pool: SyncThreads) -> None:
        super().__init__(name="taskq sync task", daemon=True)
        self._pool = pool
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            try:
                work = self.inbox.get(timeout=IDLE_THREAD_SECONDS)
            except queue.Empty:
                if self._pool._retire(self):
                    return
                continue  # a call is on its way
            if work is None:
                return
            call, context, loop, future = work
            value: Any = None
            error: BaseException | None = None
            try:
                value = context.run(call.fn)
            except BaseException as exc:  # handed to the job's task, which decides
                error = exc
            finally:
                call.returned = True
            self._pool._returned(self)
            # Unless the event loop is closed: the worker is gone and nobody waits.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, value, error)
            del work, call, context, future, value, error


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return  # abandoned: the job ended without this value
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
