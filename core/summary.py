"""What every stage summary is: a frozen dataclass, written as one JSON file by the run that
made it, read back by later runs, reports and other stages (fields an older tessera did not
write take their defaults)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from tessera.core.storage import Store


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageSummary:
    """The fields every summary has; the engine sets the time and the retries."""

    FILE: ClassVar[str]  # its name in the stage's folder
    seconds: float = 0.0
    store_retries: int = 0  # store calls retried (by the driver and its Ray work)
    up_to_date: bool = False  # this run found the stage done and wrote nothing

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
