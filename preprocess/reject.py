"""The single error type of per-sample work: a sample becomes a record or a reject."""

from __future__ import annotations


class Reject(Exception):
    """An input that cannot become a training sample, with the reason a user reads."""

    def __init__(self, modality: str | None, reason: str):
        super().__init__(f"{modality or 'sample'}: {reason}")
        self.modality = modality
        self.reason = reason
