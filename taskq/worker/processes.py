"""Processes for CPU-bound sync tasks (``executor="process"``): a pool of fresh interpreters.

A thread runs Python under the GIL: CPU-bound sync tasks in threads use one
core however many run. Each process of this pool is a new interpreter
(``sys.executable``, started like multiprocessing's ``spawn``): it inherits
no event loop, no asyncpg connection and no other descriptor from the worker
(the descriptors of a fork would share the worker's sockets with Postgres).

The worker talks to a process over its stdin and stdout, one frame per
message (4-byte length, a kind byte, JSON); the process moves its own stdout
to stderr first, so a task's ``print()`` cannot garble a frame. A job's
stored arguments go as JSON, the process imports the task's module, decodes
them with the task's own codec (typed arguments work as in the worker), calls
the function and sends the encoded result back as JSON.

Only waiting is cancellable in the worker, not the function: a timeout, a
cancel or a forced shutdown SIGKILLs the process running the job, and the
next job gets a fresh one. A process that dies fails its job (``ProcessDied``).
A process that has run ``max_jobs`` jobs is replaced, to give back memory a
task leaks. A task's ``JobContext`` is rebuilt in the process: its
``progress()`` comes back to the worker as frames (``transaction()`` and
``step()`` need the worker's connections, and raise).

Processes ignore SIGINT and SIGTERM (a Ctrl-C reaches the whole process
group; the worker decides when they end) and are killed by the kernel when
the worker dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import importlib.util
import io
import logging
import os
import pickle
import signal
import struct
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson

from .._errors import SerializationError
from .._hooks import JobContext
from .._retry import coerce_retry
from .._serialization import encode
from .._task import Task

log = logging.getLogger("taskq.worker")

#: Frame kinds: init (worker -> process), ready, job, result, error, bad result, progress.
_INIT, _READY, _JOB, _RESULT, _ERROR, _BAD_RESULT = b"I", b"Y", b"J", b"R", b"E", b"B"
_PROGRESS = b"P"
#: Least seconds between two progress frames of one job (the latest value wins;
#: the worker coalesces its writes to Postgres further, to one a second).
PROGRESS_FRAME_SECONDS = 0.1
_HEADER = struct.Struct(">I")
#: The command a process runs; the rest comes in the init frame.
_CHILD_CODE = "from taskq.worker.processes import child_main; child_main()"
#: Seconds an idle process gets to exit after its stdin closes, before SIGKILL.
CLOSE_GRACE_SECONDS = 2.0


class ProcessDied(RuntimeError):
    """The process running a job ended before it returned (killed from outside, ``os._exit``)."""


class ChildTraceback(Exception):
    """Carries the traceback of an exception raised in a process (its ``__cause__``)."""

    def __str__(self) -> str:
        return "traceback in the task's process:\n" + str(self.args[0] if self.args else "")


def default_pool_size(concurrency: int) -> int:
    """The smaller of the worker's concurrency and the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(concurrency, cores))


class _Child:
    """One process of the pool and the jobs it has run."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.jobs = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, kind: bytes, body: bytes, what: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(_HEADER.pack(len(body) + 1) + kind + body)
            await stdin.drain()
        except ConnectionError:
            raise ProcessDied(f"{what}: {await self._ended()}") from None

    async def receive(self, what: str) -> tuple[bytes, bytes]:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            (size,) = _HEADER.unpack(await stdout.readexactly(_HEADER.size))
            frame = await stdout.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise ProcessDied(f"{what}: {await self._ended()}") from None
        return frame[:1], frame[1:]

    async def _ended(self) -> str:
        try:
            code = await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            return f"its process {self.pid} closed its pipe but did not exit"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"its process {self.pid} was killed by {signal.Signals(-code).name}"
        return f"its process {self.pid} exited with status {code}"

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


class ProcessPool:
    """Runs ``executor="process"`` tasks in at most ``size`` processes, started when needed."""

    def __init__(self, size: int, max_jobs: int, modules: list[str]) -> None:
        self.size = size
        self.max_jobs = max_jobs
        self._modules = modules  # imported by each process when it starts
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()
        self._closed = False
        self._ending: set[asyncio.Task[None]] = set()  # retired processes exiting

    @property
    def pids(self) -> list[int]:
        """The pids of the pool's processes now."""
        return [c.pid for c in self._children]

    async def run(
        self,
        task: Task[Any, Any],
        stored: dict[str, Any],
        timeout: float | None,
        ctx: JobContext | None = None,
    ) -> Any:
        """Run ``task`` with its stored arguments in a process; its decoded result.

        ``ctx``: the attempt's context, for a task with a ``JobContext``
        parameter: the process gets a copy whose ``progress()`` reports back
        to it (see ``child_context``).

        The timeout counts from when a process takes the job (a wait for a
        free process is not the job's time). On timeout, cancellation or any
        other failure, the process is killed: it may be anywhere in the job.

        Raises:
            TimeoutError: the timeout passed.
            ProcessDied: the process ended before it returned.
            Exception: what the function raised (rebuilt; see ``rebuild_error``).
        """
        job = orjson.dumps(
            {
                "target": target(task),
                "name": task.name,
                "args": stored,
                "context": None if ctx is None else context_fields(ctx),
            }
        )
        async with self._slots:
            if self._closed:
                raise RuntimeError("the worker's process pool is closed")
            child = await self._take()
            try:
                async with asyncio.timeout(timeout):
                    what = f"task {task.name!r}"
                    await child.send(_JOB, job, what)
                    kind, body = await child.receive(what)
                    while kind == _PROGRESS:
                        if ctx is not None:
                            ctx.progress(*orjson.loads(body))
                        kind, body = await child.receive(what)
            except TimeoutError:
                self._discard(child)
                raise TimeoutError(
                    f"task {task.name!r} ran past its timeout of {timeout:g}s; its process "
                    f"{child.pid} was killed"
                ) from None
            except BaseException:
                self._discard(child)
                raise
            child.jobs += 1
            if child.jobs >= self.max_jobs:
                self._retire(child)
            else:
                self._idle.append(child)
        if kind == _RESULT:
            return task.codec.decode_result(orjson.loads(body))
        if kind == _BAD_RESULT:
            raise SerializationError(body.decode())
        raise rebuild_error(orjson.loads(body))

    async def _take(self) -> _Child:
        if self._idle:
            return self._idle.pop()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD_CODE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 20,
            # taskq itself must import before the init frame sets sys.path:
            # the worker's path (a script may have added taskq's checkout).
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        child = _Child(proc)
        self._children.add(child)
        try:
            init = {"path": sys.path, "modules": self._modules, "parent": os.getpid()}
            what = "starting a process for executor='process' tasks"
            await child.send(_INIT, orjson.dumps(init), what)
            kind, _ = await child.receive(what)
            if kind != _READY:
                raise ProcessDied(f"a new process {child.pid} answered {kind!r}, not ready")
        except BaseException:
            self._discard(child)
            raise
        log.debug("process %d started for process tasks", child.pid)
        return child

    def _discard(self, child: _Child) -> None:
        child.kill()
        self._children.discard(child)

    def _retire(self, child: _Child) -> None:
        """Let a process go after its last job: its stdin closes, it exits."""
        self._children.discard(child)
        log.debug("process %d ran %d jobs: replaced", child.pid, child.jobs)
        ending = asyncio.get_running_loop().create_task(_end(child))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    async def close(self) -> None:
        """End every process: idle ones exit when their stdin closes; the rest are killed."""
        self._closed = True
        children, self._children = list(self._children), set()
        self._idle = []
        ends = [_end(c) for c in children]
        await asyncio.gather(*ends, *self._ending, return_exceptions=True)


async def _end(child: _Child) -> None:
    if child.proc.stdin is not None:
        child.proc.stdin.close()
    try:
        await asyncio.wait_for(child.proc.wait(), CLOSE_GRACE_SECONDS)
    except TimeoutError:
        child.kill()
    except asyncio.CancelledError:
        child.kill()
        raise


def context_fields(ctx: JobContext) -> dict[str, Any]:
    """What a process needs to make the attempt's context (``child_context``)."""
    lease = ctx.lease_deadline
    return {
        "id": ctx.id,
        "task": ctx.task,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "max_attempts": ctx.max_attempts,
        "priority": ctx.priority,
        "args": ctx.args,
        "meta": ctx.meta,
        "worker_id": ctx.worker_id,
        "lease_left": None if lease is None else lease - time.monotonic(),
    }


def target(task: Task[Any, Any]) -> dict[str, str | None]:
    """Where a process finds the task's function: its module (or file) and qualified name."""
    fn = task.fn
    module: str = fn.__module__
    path = None
    if module == "__main__":
        # The script the worker runs: by the name it was run as (-m), else by its file.
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name and not spec.name.endswith("__main__"):
            module = spec.name
        else:
            path = getattr(main, "__file__", None)
    return {"module": module, "path": path, "qualname": fn.__qualname__}


class _StandIns:
    """Exception classes named like those that could not cross back from a process."""

    made: dict[str, type[Exception]] = {}  # noqa: RUF012

    @classmethod
    def get(cls, name: str) -> type[Exception]:
        if name not in cls.made:
            module, _, qualname = name.rpartition(".")
            cls.made[name] = type(
                qualname.rpartition(".")[2] or "Error",
                (Exception,),
                {"__module__": module or "builtins", "__qualname__": qualname},
            )
        return cls.made[name]


def rebuild_error(err: dict[str, Any]) -> Exception:
    """The exception a process sent: itself if it unpickles, else one of its type's name.

    Its ``__cause__`` carries the process's traceback, so the job's stored
    traceback shows where in the function it was raised.
    """
    exc: Any = None
    if err.get("pickle"):
        with contextlib.suppress(Exception):
            exc = pickle.loads(base64.b64decode(err["pickle"]))
    if not isinstance(exc, Exception):
        exc = _StandIns.get(err["type"])(err["message"])
    exc.__cause__ = ChildTraceback(err["traceback"])
    return exc  # type: ignore[no-any-return]


# -- in the process -----------------------------------------------------------------------


def child_main() -> None:
    """The process's loop: init, then one job per frame until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Frames use the original stdin/stdout; the task's prints go to stderr.
    with io.open(os.dup(0), "rb") as inp, io.open(os.dup(1), "wb") as out:  # noqa: UP020
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(2, 1)
        _serve(inp, out)


def _serve(inp: Any, out: Any) -> None:
    frame = _read(inp)
    if frame is None or frame[0] != _INIT:
        return
    init = orjson.loads(frame[1])
    _die_with(init["parent"])
    sys.path[:] = init["path"]
    for module in init["modules"]:
        # A module that fails here fails again, with its traceback, in its job.
        with contextlib.suppress(BaseException):
            importlib.import_module(module)
    _write(out, _READY, b"")
    tasks: dict[str, Any] = {}
    while (frame := _read(inp)) is not None:
        _write(out, *_run(orjson.loads(frame[1]), tasks, out))


def _die_with(parent: int) -> None:
    """Be killed when the worker dies (Linux), so that no process outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _read(inp: Any) -> tuple[bytes, bytes] | None:
    header = inp.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    frame = inp.read(size)
    if len(frame) < size:
        return None
    return frame[:1], frame[1:]


def _write(out: Any, kind: bytes, body: bytes) -> None:
    out.write(_HEADER.pack(len(body) + 1) + kind + body)
    out.flush()


def _run(job: dict[str, Any], tasks: dict[str, Any], out: Any) -> tuple[bytes, bytes]:
    name = job["name"]
    control = None if job["context"] is None else _ChildControl(out, job["context"]["lease_left"])
    try:
        task = tasks.get(name) or _find(name, job["target"])
        tasks[name] = task
        ctx = None if control is None else child_context(job["context"], control)
        args, kwargs = task.call_arguments(job["args"], ctx)
        value = task.fn(*args, **kwargs)
    except BaseException as exc:  # SystemExit too: the job fails, the process goes on
        return _ERROR, orjson.dumps(_describe(exc))
    finally:
        if control is not None:
            control.flush()
    try:
        text = encode(task.codec.encode_result(value), what=f"result of task {name!r}")
    except Exception as exc:
        return _BAD_RESULT, str(exc).encode()
    return _RESULT, text.encode()


def child_context(fields: dict[str, Any], control: _ChildControl) -> JobContext:
    """The attempt's context in a process: its fields, and progress sent to the worker."""
    fields = {k: v for k, v in fields.items() if k != "lease_left"}
    return JobContext(**fields, control=control)


class _ChildControl:
    """A ``JobControl`` in a process: progress goes to the worker as frames, nothing else.

    ``cancelled`` stays false (a cancelled job's process is killed), and the
    lease deadline is the one at the job's start (the worker renews it).
    """

    def __init__(self, out: Any, lease_left: float | None) -> None:
        self._out = out
        self._deadline = time.monotonic() + (lease_left or 0.0)
        self._sent = 0.0
        self._pending: tuple[float, str | None] | None = None

    @property
    def cancelled(self) -> bool:
        return False

    @property
    def lease_deadline(self) -> float:
        return self._deadline

    def report(self, fraction: float, message: str | None) -> None:
        self._pending = (fraction, message)
        if time.monotonic() - self._sent >= PROGRESS_FRAME_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending is not None:
            _write(self._out, _PROGRESS, orjson.dumps(self._pending))
            self._pending = None
            self._sent = time.monotonic()

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        raise RuntimeError(_NOT_HERE.format("ctx.transaction()"))

    def step(
        self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[Any]:
        raise RuntimeError(_NOT_HERE.format("ctx.step()"))


_NOT_HERE = (
    "{} is not available in a task with executor='process': its process has no "
    "connection to Postgres (only ctx.progress() reaches the worker); use an async def "
    "task, or executor='thread'"
)


def _find(name: str, where: dict[str, Any]) -> Task[Any, Any]:
    """The task in this process: its module imported, its function looked up by qualname."""
    if where["path"]:
        spec = importlib.util.spec_from_file_location("__mp_main__", where["path"])
        assert spec is not None
        assert spec.loader is not None
        module = sys.modules.get("__mp_main__") or importlib.util.module_from_spec(spec)
        if "__mp_main__" not in sys.modules:
            sys.modules["__mp_main__"] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where["module"])
    found: Any = module
    for part in where["qualname"].split("."):
        found = getattr(found, part, None)
    if isinstance(found, Task):
        return found
    if callable(found):  # registered under another name: a task of its own here
        return Task(
            None,  # type: ignore[arg-type]  # never enqueued from here
            found,
            name=name,
            queue="default",
            priority=0,
            retry=coerce_retry(None),
            timeout=None,
        )
    raise LookupError(
        f"task {name!r}: {where['module']}.{where['qualname']} is not found in its process; "
        "executor='process' needs the function importable by its module and name"
    )


def _describe(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    pickled = None
    with contextlib.suppress(Exception):
        data = pickle.dumps(exc)
        pickle.loads(data)  # what does not come back would fail in the worker
        pickled = base64.b64encode(data).decode()
    try:
        message = str(exc)
    except Exception as str_error:
        message = f"<str() of the exception failed: {str_error!r}>"
    module = "" if cls.__module__ == "builtins" else cls.__module__ + "."
    return {
        "type": module + cls.__qualname__,
        "message": message,
        "traceback": "".join(traceback.format_exception(exc)),
        "pickle": pickled,
    }
