"""The stage engine: what every stage driver would otherwise repeat, written once.

A stage is a small typed contract (`Stage`): the folder it writes, whether that folder is up
to date for its inputs and config (`current`, reads only), the work (`run`: plan the items
and run each as Ray work through `StageRun.map` — plain functions underneath — then
summarize), and the checks its summary must pass (`check`). `execute` owns the rest: the
folder's lease (or the fence of a caller that holds it), Ray brought up only when there is
work, the store retries counted for this stage alone, one progress bar per batch of items,
the summary's fence check and write (last: the stage is complete), the checks. Stage
commit points inside tasks check the fence they are handed; no driver takes a lease or
writes a summary itself.

`command` is a writing command's scope around its stages: the folder's lease taken before
Ray starts (a held folder exits 75 at once), and the command's logs kept in FOLDER/logs/
whatever happens (a full disk said in one line)."""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from tessera.core.errors import OutOfSpace
from tessera.core.lease import Fence, Lease, LeaseConfig, held
from tessera.core.runner import StageWork, in_flight_limit
from tessera.core.runtime import RuntimeConfig, save_logs, start_ray
from tessera.core.storage import Store, counting_retries, out_of_space
from tessera.core.summary import StageSummary

log = logging.getLogger(__name__)

S = TypeVar("S", bound=StageSummary)
Item = TypeVar("Item")


@dataclass
class StageRun:
    """What a stage's `run` is handed: the folder's fence (for its tasks' commit points), the
    Ray work (nodes, retries), and a bounded runner with a progress bar."""

    folder: Store
    fence: Fence
    progress: bool
    work: StageWork = field(default_factory=StageWork)

    def bar(self, desc: str, total: int | None = None, unit: str = "item"):
        """A progress bar of this stage (drawn only with runtime.progress)."""
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, desc=desc, disable=not self.progress)

    def map(self, items: Iterable[Item], submit: Callable[[Item, int], Any],
            on_done: Callable[[Item, Any], None] = lambda item, value: None, limit: int | None = None) -> None:
        """SUBMIT(item, slot) -> an ObjectRef for each item, lazily, at most LIMIT (default: enough
        to keep the cluster busy) in flight; ON_DONE(item, value) as each finishes."""
        self.work.run(items, submit, limit or in_flight_limit(), on_done)

    def get(self, ref) -> Any:
        """The value of one piece of Ray work (its retries counted)."""
        return self.work.get(ref)

    def get_all(self, refs: list) -> list:
        return self.work.get_all(refs)


class Stage(ABC, Generic[S]):
    """One stage of tessera (see the module doc). `command` names the lease's holder."""

    command: ClassVar[str]
    folder: Store

    def current(self) -> S | None:
        """The folder's summary when it is up to date for this stage's inputs and config (no
        Ray, no input opened), else None."""
        return None

    @abstractmethod
    def run(self, run: StageRun) -> S:
        """Do the work and return its summary (not yet written; the engine adds the time and
        the retries)."""

    def check(self, summary: S) -> S:
        """SUMMARY, or StageFailed when the outputs fail a check the config sets."""
        return summary


def execute(stage: Stage[S], lease: LeaseConfig | Fence, progress: bool = True,
            start: Callable[[], None] = lambda: None) -> S:
    """Run STAGE holding its folder's lease (LEASE: a config to take it with, or the fence of a
    caller that holds it); START brings Ray up, called only when there is work. Returns the
    summary, written to the folder last."""
    with held(stage.folder, lease, stage.command) as fence:
        current = stage.current()
        if current is not None:
            log.info("%s: up to date (%s)", stage.command.split()[-1], stage.folder.url)
            return stage.check(current.replace(up_to_date=True))
        start()
        started = time.perf_counter()
        with counting_retries() as driver:
            run = StageRun(stage.folder, fence, progress)
            summary = stage.run(run)
            summary = summary.replace(seconds=round(time.perf_counter() - started, 3),
                                      store_retries=run.work.task_retries + driver.value)
            fence.check(summary.FILE)
            summary.write(stage.folder)
    return stage.check(summary)


@contextlib.contextmanager
def command(folder: Store, runtime: RuntimeConfig, name: str) -> Iterator[Fence]:
    """A writing command's scope (see the module doc): FOLDER's lease, then the block; its
    logs are kept in FOLDER/logs/ whatever happens, and an error names where."""
    with Lease(folder, runtime.lease, name) as fence:
        try:
            yield fence
        except BaseException as e:  # (an interrupt too: what ran is logged)
            full = out_of_space(e)
            if full is not None:  # one line, not the traceback of whichever task hit it
                e = OutOfSpace(f"{full}, writing into {folder.url}: free some space and run again (what was "
                               "committed is kept, and resumed)")
            e.add_note(f"logs: {keep_logs(folder, runtime, name, fence)}")
            if full is not None:
                raise e from None
            raise
        keep_logs(folder, runtime, name, fence)


def keep_logs(folder: Store, runtime: RuntimeConfig, name: str, fence: Fence) -> str:
    """Where this command's logs are: FOLDER/logs/... (while its lease holds), or where they are
    on this machine when they could not be copied there (a full disk, or a lease another writer
    took over, must not hide the error that ended the run)."""
    try:
        fence.check(f"{name}'s logs")
        return save_logs(folder, name, runtime)
    except Exception as error:
        from tessera.core.runtime import local_logs

        return f"{local_logs()} (not copied into {folder.url}: {out_of_space(error) or error})"


def run_command(stage: Stage[S], runtime: RuntimeConfig, uses_ray: bool = True) -> S:
    """STAGE as a command of its own: its summary when it is up to date (no lease taken, no Ray
    started, nothing written); else `command`'s scope, Ray brought up (USES_RAY) and the stage."""
    current = stage.current()
    if current is not None:
        log.info("%s: up to date (%s)", stage.command.split()[-1], stage.folder.url)
        return stage.check(current.replace(up_to_date=True))
    with command(stage.folder, runtime, stage.command) as fence:
        return execute(stage, fence, runtime.progress, start=(lambda: start_ray(runtime)) if uses_ray else lambda: None)
