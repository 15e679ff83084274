"""The base of every typed config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # A misspelt field is an error that names it, never a silently ignored default.
    model_config = ConfigDict(extra="forbid", frozen=True)
