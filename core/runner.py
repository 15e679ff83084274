"""How a stage's plain functions run on Ray: as tasks (or calls of a plain class's methods on
actors) that report where they ran and how many store calls they retried, submitted by one
bounded loop (`StageWork.run`) that every stage driver uses. The per-item code never sees Ray,
and importing a stage imports no Ray: the remote functions are made on first use (a command
that finds its output up to date never loads it)."""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from tessera.core.storage import counting_retries, out_of_space

Item = TypeVar("Item")


@dataclass(frozen=True)
class Done:
    """A finished piece of Ray work: what it returned, the node it ran on, the store calls it retried."""

    value: Any
    node: str
    store_retries: int


def _reported(call: Callable, args: tuple, kwargs: dict) -> Done:
    try:
        with counting_retries() as retried:
            value = call(*args, **kwargs)
    except OSError as error:  # a full disk is no error a retry mends: Ray retries OSError only
        full = out_of_space(error)
        if full is None:
            raise
        raise full from error
    import ray  # (in a Ray worker: already loaded)

    return Done(value, ray.get_runtime_context().get_node_id(), retried.value)


class _Remote:
    """A Ray remote function or actor class, made when it is first used."""

    def __init__(self, target: Callable | type, options: dict):
        self._target, self._options, self._made = target, options, None

    def _remote(self):
        if self._made is None:
            import ray

            self._made = ray.remote(**self._options)(self._target)
        return self._made

    def remote(self, *args, **kwargs):
        return self._remote().remote(*args, **kwargs)

    def options(self, **options):
        return self._remote().options(**options)


# what every stage's Ray work is: idempotent (whole files committed, a marker or summary last), so
# Ray may run it again after a node is lost and after a store error that outlasted the store's
# own retries (an OSError; a full disk is raised as OutOfSpace, which is not one)
RETRIED = {"max_retries": 3, "retry_exceptions": [OSError]}


def task(fn: Callable, **options):
    """FN as a Ray task (OPTIONS as ray.remote takes them, over RETRIED) whose result is a Done."""

    @functools.wraps(fn)
    def run(*args, **kwargs) -> Done:
        return _reported(fn, args, kwargs)

    return _Remote(run, {**RETRIED, **options})


def actor(cls: type, methods: tuple[str, ...], **options):
    """CLS as a Ray actor class whose METHODS (what the driver calls, as
    `handle.method.remote(...)`) return a Done; its other methods stay as they are."""

    def reporting(method: Callable) -> Callable:
        @functools.wraps(method)
        def call(self, *args, **kwargs) -> Done:
            return _reported(functools.partial(method, self), args, kwargs)

        return call

    wrapped = {name: reporting(getattr(cls, name)) for name in methods}
    reported = type(cls.__name__, (cls,), {**wrapped, "__qualname__": cls.__name__})
    return _Remote(reported, options)


def in_flight_limit() -> int:
    """Tasks kept in flight: enough to keep every CPU of the cluster busy, few enough that the
    driver holds little."""
    import ray

    return max(8, 4 * int(ray.cluster_resources().get("CPU", 1)))


ABANDON_WAIT_S = 10.0  # how long a failing stage waits for the work still in flight


def _abandon(refs: list) -> None:
    """When a stage fails (or is stopped), let the work still in flight finish for a while — what
    it commits is kept, under the lease still held — and take its outcomes, so Ray does not
    report them as unhandled errors beside the one that ended the stage. Nothing is cancelled
    (ray.cancel racing a task that completes can abort the driver); work that outlives the wait
    finds the lease released at its commit point and commits nothing."""
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ABANDON_WAIT_S) if refs else ([], [])
    for ref in ready:
        with contextlib.suppress(BaseException):
            ray.get(ref)


class StageWork:
    """The Ray work of one stage run. Results come back through it, so it knows where the
    items of `run` ran and how many store calls the work retried (the driver's own are
    counted by the engine's scope)."""

    def __init__(self):
        self.nodes: Counter = Counter()
        self.task_retries = 0

    def _take(self, done: Done) -> Any:
        self.task_retries += done.store_retries
        return done.value

    def get(self, ref) -> Any:
        import ray

        return self._take(ray.get(ref))

    def get_all(self, refs: list) -> list:
        import ray

        return [self._take(done) for done in ray.get(refs)]

    def run(self, items: Iterable[Item], submit: Callable[[Item, int], Any], limit: int,
            on_done: Callable[[Item, Any], None] = lambda item, value: None) -> None:
        """SUBMIT(item, slot) for every item, lazily, at most LIMIT in flight; ON_DONE(item,
        value) as each finishes (in the order they finish). SLOT (0 <= slot < LIMIT) is the
        submission's own while it runs: a pool of actors maps it to one of them, so an actor
        gets its next item as it finishes one."""
        import ray

        in_flight: dict = {}  # ref -> (item, slot)
        free = list(range(limit - 1, -1, -1))

        def collect() -> None:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            item, slot = in_flight.pop(ready[0])
            free.append(slot)
            done = ray.get(ready[0])
            self.nodes[done.node] += 1
            on_done(item, self._take(done))

        try:
            for item in items:
                if not free:
                    collect()
                slot = free.pop()
                in_flight[submit(item, slot)] = (item, slot)
            while in_flight:
                collect()
        except BaseException:
            _abandon(list(in_flight))
            raise
