"""What every stage summary is: a frozen dataclass, written as one JSON file by the run that
made it, read back by later runs, reports and other stages (fields an older tessera did not
write take their defaults)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from preprocess.storage import Store


class StageFailed(RuntimeError):
    """A stage finished, its outputs written, but they fail a check the config sets (too many
    rejects, too many vectors not computed): the CLI exits 4 with the reasons."""


@dataclasses.dataclass(frozen=True)
class StageSummary:
    FILE: ClassVar[str]  # its name in the stage's folder

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]):
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record})

    @classmethod
    def read(cls, folder: Store):
        return cls.from_json(folder.read_json(cls.FILE))

    @classmethod
    def exists(cls, folder: Store) -> bool:
        return folder.exists(cls.FILE)

    def write(self, folder: Store) -> None:
        folder.write_json(self.FILE, self.to_json())

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
