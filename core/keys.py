"""Which row a sample is of, the rule every reader shares (no imports: the edge path uses it).

A sample's key is its manifest row's key, or, when the row's input made several samples (a
volume's slices: shard.medical.slices), the row's key, "/" and the part ("KEY/slice-012"; a
safe key holds no "/"). What is a row's — its claim on a key, its newest dataset version — goes
by the row's key; a sample is its manifest row (file, line) and its key."""

from __future__ import annotations

PART_SEPARATOR = "/"


def part_key(row_key: str, part: str) -> str:
    return f"{row_key}{PART_SEPARATOR}{part}"


def row_key_sql(column: str = "key") -> str:
    """SQL: the row's key of the sample key in COLUMN."""
    return f"split_part({column}, '{PART_SEPARATOR}', 1)"


def same_sample(drop: str, row: str) -> str:
    """SQL: drop-list row DROP (file, line, sample_key) is index row ROW (file, line, key)."""
    return f"{drop}.file = {row}.file AND {drop}.line = {row}.line AND {drop}.sample_key = {row}.key"


def part_named_sql(column: str) -> str:
    """SQL: ' PART' when the sample key in COLUMN is a part of its row ('KEY/slice-012' gives
    ' slice-012'), else '' — what follows the row's key where a reason names a sample."""
    separator = f"'{PART_SEPARATOR}'"
    return f"CASE WHEN contains({column}, {separator}) THEN ' ' || split_part({column}, {separator}, 2) ELSE '' END"
