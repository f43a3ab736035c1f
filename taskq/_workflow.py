"""Workflows: a graph of steps, built in memory, written in one transaction.

``Workflow.add()`` and ``Workflow.map()`` record steps and return
:class:`StepRef` handles; a handle used in a later step's arguments (also
inside lists and dicts) makes that step wait for it and receive its result;
``after=[...]`` orders without passing data. Steps can only refer to steps
added before them, so the graph has no cycle by construction.
``Workflow.enqueue()`` writes the whole graph with one statement
(``workflow_enqueue()``); from there on Postgres drives it (see
``taskq/objects/steps_ended.sql``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from ._errors import ConfigurationError
from ._inputs import REF_KEY
from ._options import EnqueueOptions, with_key
from ._serialization import encode
from ._task import BoundTask, Task

if TYPE_CHECKING:
    from ._enqueue import Enqueuer
    from ._workflow_run import WorkflowRun, Workflows

MAX_NAME_LENGTH = 200
_FAILURE_POLICIES = ("cancel", "run")


class WorkflowOwner(Protocol):
    """What a workflow needs of the App its tasks belong to."""

    @property
    def enqueuer(self) -> Enqueuer: ...

    @property
    def workflows(self) -> Workflows: ...


class StepRef:
    """A step of a :class:`Workflow` being built.

    Pass it as an argument of a later step (alone, or inside a list or dict)
    to make that step wait for this one and receive its result there; or list
    it in ``after=[...]`` to only wait for it.
    """

    __slots__ = ("_workflow", "kind", "name")

    def __init__(self, workflow: Workflow, name: str, kind: str) -> None:
        self._workflow = workflow
        self.name = name
        #: ``"task"`` or ``"map"``.
        self.kind = kind

    def __repr__(self) -> str:
        return f"<taskq.StepRef {self.name!r} of workflow {self._workflow.name!r}>"


class _Step:
    __slots__ = (
        "args",
        "children",
        "kind",
        "map_arg",
        "map_over",
        "name",
        "on_parent_failure",
        "opts",
        "parents",
        "task",
    )

    def __init__(
        self,
        name: str,
        task: Task[Any, Any],
        opts: EnqueueOptions,
        args: dict[str, Any],
        parents: dict[str, bool],
        *,
        kind: str = "task",
        on_parent_failure: str = "cancel",
        map_over: str | None = None,
        map_arg: str | None = None,
    ) -> None:
        self.name = name
        self.task = task
        self.opts = opts
        self.args = args
        self.parents = parents  # parent name -> receives its result
        self.kind = kind
        self.on_parent_failure = on_parent_failure
        self.map_over = map_over
        self.map_arg = map_arg
        self.children = 0


class _Placeholder:
    """Stands for a map's item argument while the signature is checked."""


class Workflow:
    """A graph of steps to run as one unit (DAG, fan-out/fan-in, map-reduce).

    Nothing is written until :meth:`enqueue`. Every step is an ordinary job
    of its task (retry policy, timeout, queue, priority, limits, hooks apply);
    a step starts when all the steps it depends on have succeeded. By default
    a step whose parent failed or was cancelled is cancelled, and so on down
    the graph; ``on_parent_failure="run"`` runs it anyway with a
    :class:`taskq.StepFailed` in place of each missing result.

    Example::

        wf = taskq.Workflow(name="report")
        pages = [wf.add(fetch, url=u) for u in urls]
        merged = wf.add(merge, parts=pages)          # parts: the list of results
        run = await wf.enqueue()
        print(await run.result(timeout=60))
    """

    def __init__(self, name: str = "workflow", *, meta: Mapping[str, Any] | None = None) -> None:
        _check_name("workflow name", name)
        if meta is not None and (
            not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta)
        ):
            raise ConfigurationError(
                f"meta must be a mapping with string keys, got {type(meta).__name__}"
            )
        self.name = name
        self.meta = dict(meta) if meta else None
        self._steps: dict[str, _Step] = {}
        self._numbers: dict[str, int] = {}
        self._owner: Any = None

    def __repr__(self) -> str:
        return f"<taskq.Workflow {self.name!r} steps={len(self._steps)}>"

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> list[str]:
        """The names of the steps added so far, in order."""
        return list(self._steps)

    # -- building ------------------------------------------------------------

    def add(
        self,
        task: Task[Any, Any] | BoundTask[Any, Any],
        /,
        *args: Any,
        after: Iterable[StepRef] = (),
        on_parent_failure: str = "cancel",
        step_name: str | None = None,
        **kwargs: Any,
    ) -> StepRef:
        """Add a step that runs ``task`` with these arguments; return its reference.

        Args:
            task: a task, or ``task.options(queue=..., priority=..., ...)``.
            args, kwargs: the task's arguments. A :class:`StepRef` anywhere in
                them (also inside lists and dicts) is a dependency whose result
                is put in its place when this step starts.
            after: steps to wait for without receiving their results.
            on_parent_failure: ``"cancel"`` (default): cancelled if a parent
                fails or is cancelled. ``"run"``: runs once every parent has
                ended, with a :class:`taskq.StepFailed` for each missing result.
            step_name: the step's name in the workflow (default: the task's
                function name, numbered from the second one on: ``fetch``,
                ``fetch-2``...).

        Raises:
            TypeError: the arguments do not fit the task's signature.
            SerializationError: a plain argument is not JSON (or its annotated type).
            ConfigurationError: a reference to another workflow's step, a bad
                option or name.
        """
        real, opts = self._resolve(task)
        if on_parent_failure not in _FAILURE_POLICIES:
            raise ConfigurationError(
                f"on_parent_failure must be 'cancel' or 'run', got {on_parent_failure!r}"
            )
        name = self._name_for(step_name, real)
        parents: dict[str, bool] = {}
        stored, key = real.bind_template(
            args,
            kwargs,
            lambda v: self._template(v, parents, name),
            key=opts.concurrency_key,
        )
        for ref in self._refs(after, "after"):
            parents.setdefault(ref.name, False)
        opts = with_key(opts, key)
        step = _Step(name, real, opts, stored, parents, on_parent_failure=on_parent_failure)
        return self._record(step)

    def map(
        self,
        task: Task[Any, Any] | BoundTask[Any, Any],
        /,
        *,
        over: StepRef,
        arg: str,
        after: Iterable[StepRef] = (),
        step_name: str | None = None,
        **kwargs: Any,
    ) -> StepRef:
        """Add one step per element of ``over``'s result (a list), made when it is known.

        Each item step runs ``task`` with the element as its ``arg`` argument
        and ``kwargs`` as the others (references allowed). The returned
        reference stands for the list of the items' results, in order: a step
        that takes it as an argument waits for every item, however many there
        turned out to be (none included: it gets ``[]``). Items are named
        ``name[0]``, ``name[1]``...

        If ``over``'s result is not a list, the map fails. If an item fails
        (after its retries), the map fails once all items have ended; a step
        with ``on_parent_failure="run"`` then gets the list with a
        :class:`taskq.StepFailed` for each failed item.
        """
        real, opts = self._resolve(task)
        if not isinstance(over, StepRef):
            raise ConfigurationError(
                f"map(over=...) takes a step of this workflow, got {type(over).__name__}"
            )
        self._refs([over], "over")
        if not isinstance(arg, str) or not arg:
            raise ConfigurationError(f"map(arg=...) names the task's argument, got {arg!r}")
        if arg in kwargs:
            raise ConfigurationError(
                f"map(arg={arg!r}): the items give {arg!r}; do not pass it as well"
            )
        if opts.unique_key is not None:
            raise ConfigurationError(
                "a map's items cannot share one unique_key; give the map a task without one"
            )
        name = self._name_for(step_name, real)
        parents: dict[str, bool] = {over.name: True}
        stored, key = real.bind_template(
            (),
            {**kwargs, arg: _Placeholder()},
            lambda v: self._template(v, parents, name),
            skip=frozenset({arg}),
            key=opts.concurrency_key,
        )
        opts = with_key(opts, key)
        if _mentions(stored, over.name):
            raise ConfigurationError(
                f"map step {name!r}: step {over.name!r} is what it maps over; its items get one "
                "element each and cannot also receive the whole list"
            )
        for ref in self._refs(after, "after"):
            parents.setdefault(ref.name, False)
        step = _Step(name, real, opts, stored, parents, kind="map", map_over=over.name, map_arg=arg)
        return self._record(step)

    def _resolve(
        self, task: Task[Any, Any] | BoundTask[Any, Any]
    ) -> tuple[Task[Any, Any], EnqueueOptions]:
        if isinstance(task, BoundTask):
            real, opts = task.task, task.opts
        elif isinstance(task, Task):
            real, opts = task, EnqueueOptions()
        else:
            raise TypeError(
                "a workflow step runs a task (a function decorated with @app.task, or "
                f"task.options(...)), got {type(task).__name__}"
            )
        if self._owner is None:
            self._owner = real.app
        elif real.app is not self._owner:
            raise ConfigurationError(
                f"task {real.name!r} belongs to another App than this workflow's other steps"
            )
        if opts.connection is not None:
            raise ConfigurationError(
                "a step's options cannot take a connection: give it to wf.enqueue(connection=...)"
                ", which writes the whole workflow in that transaction"
            )
        if opts.unique_for:
            raise ConfigurationError(
                "unique_for does not apply to workflow steps (unique_key does: at most one live "
                "job per key and queue)"
            )
        return real, opts

    def _name_for(self, given: str | None, task: Task[Any, Any]) -> str:
        if given is not None:
            _check_name("step_name", given)
            if "[" in given or "]" in given:
                raise ConfigurationError(
                    f"step_name {given!r}: '[' and ']' are kept for the items of a map"
                )
            if given in self._steps:
                raise ConfigurationError(f"workflow {self.name!r} already has a step {given!r}")
            return given
        base = (
            task.name.rsplit(".", 1)[-1][: MAX_NAME_LENGTH - 8].replace("[", "(").replace("]", ")")
        )
        # Numbered from the last number given to this base (a scan from 1
        # would make adding n steps of one task quadratic).
        n = self._numbers.get(base, 0)
        name = base if n == 0 else f"{base}-{n + 1}"
        while name in self._steps:
            n += 1
            name = f"{base}-{n + 1}"
        self._numbers[base] = n + 1
        return name

    def _refs(self, refs: Iterable[StepRef], what: str) -> list[StepRef]:
        if isinstance(refs, StepRef):
            refs = [refs]
        out = []
        for ref in refs:
            if not isinstance(ref, StepRef):
                raise ConfigurationError(
                    f"{what}= takes steps of this workflow (what add() returned), got "
                    f"{type(ref).__name__}"
                )
            self._check_ref(ref)
            out.append(ref)
        return out

    def _check_ref(self, ref: StepRef) -> None:
        if ref._workflow is not self:
            raise ConfigurationError(
                f"step {ref.name!r} belongs to workflow {ref._workflow.name!r}, not to "
                f"{self.name!r}: a step can only depend on steps of its own workflow"
            )
        if ref.name not in self._steps:  # cannot happen through add(): kept for safety
            raise ConfigurationError(f"step {ref.name!r} is not part of workflow {self.name!r}")

    def _template(self, value: Any, parents: dict[str, bool], child: str) -> Any:
        """The stored form of ``value`` if it holds step references, else None."""
        found = False

        def walk(v: Any, path: str) -> Any:
            nonlocal found
            if isinstance(v, StepRef):
                self._check_ref(v)
                parents[v.name] = True
                found = True
                return {REF_KEY: v.name}
            if isinstance(v, list | tuple):
                return [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]
            if isinstance(v, Mapping):
                return {k: walk(x, f"{path}[{k!r}]") for k, x in v.items()}
            return v

        stored = walk(value, "")
        if not found:
            return None
        bad = _non_string_key(stored)
        if bad is not None:
            raise ConfigurationError(
                f"step {child!r}: a dict that holds step references must have string keys "
                f"(got {bad!r})"
            )
        return stored

    def _record(self, step: _Step) -> StepRef:
        # Not JSON: refused now, where the caller wrote it (enqueue() checks
        # the App's size limit again).
        encode(step.args, what=f"arguments of step {step.name!r} (task {step.task.name!r})")
        for parent in step.parents:
            self._steps[parent].children += 1
        self._steps[step.name] = step
        return StepRef(self, step.name, step.kind)

    # -- writing ---------------------------------------------------------------

    async def enqueue(self, *, connection: Any = None) -> WorkflowRun:
        """Write the whole workflow in one transaction; return its handle.

        Steps without parents are queued at once; the others wait for theirs.

        Args:
            connection: an asyncpg connection whose open transaction the
                workflow joins: it exists (and starts) only if that transaction
                commits.

        Raises:
            ConfigurationError: the workflow has no step.
            SerializationError: a step's arguments are not JSON; nothing was written.
            DatabaseError: Postgres could not be reached; nothing was written.
        """
        if not self._steps:
            raise ConfigurationError(f"workflow {self.name!r} has no steps; add() some first")
        if connection is not None and not hasattr(connection, "fetchval"):
            raise ConfigurationError(
                f"connection must be an asyncpg connection, got {type(connection).__name__}"
            )
        owner = cast(WorkflowOwner, self._owner)
        specs = []
        for step in self._steps.values():
            task = step.task
            opts = step.opts
            specs.append(
                {
                    "name": step.name,
                    "task": task.name,
                    "queue": opts.queue or task.queue,
                    "priority": opts.priority if opts.priority is not None else task.priority,
                    "args": step.args,
                    "max_attempts": task.retry.attempts,
                    "delay": opts.delay,
                    "run_at": opts.run_at.isoformat() if opts.run_at else None,
                    "unique_key": opts.unique_key,
                    "concurrency_key": opts.concurrency_key,
                    "meta": dict(opts.meta) if opts.meta else None,
                    "kind": step.kind,
                    "on_parent_failure": step.on_parent_failure,
                    "sink": step.children == 0,
                    "map_over": step.map_over,
                    "map_arg": step.map_arg,
                    "parents": [{"step": p, "data": d} for p, d in step.parents.items()],
                }
            )
        workflow_id, job_ids = await owner.enqueuer.enqueue_workflow(
            self.name, specs, meta=self.meta, connection=connection
        )
        return owner.workflows.run(workflow_id, dict(zip(self._steps, job_ids, strict=True)))


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or not name or not name.strip():
        raise ConfigurationError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigurationError(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if "\x00" in name:
        raise ConfigurationError(f"{what} {name!r} holds a NUL character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(f"{what} {name!r} is not valid text") from None


def _mentions(value: Any, step: str) -> bool:
    if isinstance(value, dict):
        if value.get(REF_KEY) == step and len(value) == 1:
            return True
        return any(_mentions(v, step) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, step) for v in value)
    return False


def _non_string_key(value: Any) -> Any:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return k
            bad = _non_string_key(v)
            if bad is not None:
                return bad
    elif isinstance(value, list):
        for v in value:
            bad = _non_string_key(v)
            if bad is not None:
                return bad
    return None
