"""The errors a command reports in one line and an exit code. Each says its own code, so the
CLI maps none by hand and `tessera --help` lists them from here."""

from __future__ import annotations

from typing import ClassVar


class TesseraError(Exception):
    """A failure a person can act on from its message alone (no traceback shown)."""

    exit_code: ClassVar[int] = 1
    meaning: ClassVar[str] = "any other failure"


class ConfigError(TesseraError, ValueError):
    """A config that cannot be used; the message names each bad field."""

    exit_code = 2
    meaning = "invalid config or command line"


class OutputConflict(TesseraError):
    """An output folder already holds outputs written from another config or other inputs."""

    exit_code = 3
    meaning = "the output folder holds another config's or manifest's output"


class StageFailed(TesseraError):
    """A stage finished, its outputs written, but they fail a check the config sets (too many
    rejects, too many vectors not computed)."""

    exit_code = 4
    meaning = "outputs written, but they fail a check the config sets (too many rejects or errors)"


class NotAnInput(TesseraError, FileNotFoundError):
    """An input or folder a command was given is not there, or is not what it reads."""

    exit_code = 66  # EX_NOINPUT
    meaning = "an input or folder named is not there, or is not what the command reads"


class DamagedOutput(TesseraError):
    """Committed files of a folder are gone or cut since they were committed; the message names
    them and the command that writes them again."""

    exit_code = 66
    meaning = "committed files of a folder are damaged (named, with the command that redoes them)"


class OutOfSpace(TesseraError):
    """A write found its device (or quota) full. Not an OSError on purpose: nothing retries it
    (the store's retries are for transient errors, Ray's for OSError)."""

    exit_code = 74  # EX_IOERR
    meaning = "no space left where the command writes (free some and run again: it resumes)"


class LeaseHeld(TesseraError):
    """Another live writer holds the folder: a scheduler retries later."""

    exit_code = 75  # EX_TEMPFAIL
    meaning = "another writer holds the output folder (retry later, or --wait)"


class LeaseLost(TesseraError):
    """This writer's lease was taken over by another: it must not commit."""


class StoppedOnRequest(TesseraError):
    """A run ended early because its folder's stop file asked it to (a tune scheduler stopping a
    trial): checkpointed, no outputs; the same command resumes it."""

    exit_code = 75
    meaning = "stopped on request (RUN/stop-requested), checkpointed: run the command again to resume"


REPORTED = (ConfigError, OutputConflict, StageFailed, NotAnInput, DamagedOutput, OutOfSpace, LeaseHeld,
            StoppedOnRequest)
