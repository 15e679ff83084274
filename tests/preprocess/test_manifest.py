import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preprocess.config import ShardConfig
from preprocess.manifest import read_manifest
from tests.conftest import LABELS, MINI


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_mini_manifest_rows_resolve_relative_paths():
    rows, rejects = read_manifest(str(MINI / "manifest.jsonl"), ShardConfig(labels=LABELS), {})
    assert len(rows) == 43 and rejects == []
    astronaut = rows[0]
    assert astronaut.files["image"] == str(MINI / "images" / "astronaut.png")
    assert astronaut.modalities == ("image", "text", "audio", "video")
    note = next(r for r in rows if r.key == "note-only")
    assert note.modalities == ("text",) and note.files == {}


def test_row_checks(tmp_path):
    lines = [
        {"key": "a", "text": "x", "label": "cat", "source": "crawl-7"},
        {"key": "a", "text": "again"},
        {"text": "no key"},
        {"key": "b", "label": "cat"},
        {"key": "c", "text": "x", "label": 3},
        {"key": "d", "text": 5},
        [1, 2],
        "{broken",
        {"key": "e", "image": "img/e.jpg", "label": "dog"},
    ]
    rows, rejects = read_manifest(write_jsonl(tmp_path / "m.jsonl", lines), ShardConfig(), {})
    assert [r.key for r in rows] == ["a", "e"]
    assert rows[0].metadata == {"source": "crawl-7"}
    assert rows[1].files["image"] == str(tmp_path / "img" / "e.jpg")
    got = {r.line: (r.key, r.modality, r.reason) for r in rejects}
    assert got[2] == ("a", None, "duplicate key (first on line 1)")
    assert got[3][2].startswith("key is missing")
    assert got[4] == ("b", None, "sample has no modality")
    assert got[5] == ("c", "label", "label has the wrong type int, expected str")
    assert got[6][1:] == ("text", "text has the wrong type int, expected a string")
    assert got[7] == (None, None, "manifest line is a list, not an object")
    assert got[8][0] is None and got[8][2].startswith("manifest line is not valid JSON")


def test_label_set_and_required_modalities(tmp_path):
    lines = [{"key": "a", "text": "x", "label": "cat"}, {"key": "b", "text": "x", "label": "person"}]
    cfg = ShardConfig(labels=LABELS, required_modalities=("text",))
    rows, rejects = read_manifest(write_jsonl(tmp_path / "m.jsonl", lines), cfg, {})
    assert [r.key for r in rows] == ["b"] and rejects[0].reason == "label 'cat' is not in the label set"
    cfg = ShardConfig(required_modalities=("image",))
    rows, rejects = read_manifest(str(tmp_path / "m.jsonl"), cfg, {})
    assert rows == [] and {r.reason for r in rejects} == {"required modality image is missing"}


def test_keys_that_collide_after_making_them_safe_are_not_confused(tmp_path):
    rows, rejects = read_manifest(write_jsonl(tmp_path / "m.jsonl", [
        {"key": "v1.2", "text": "x"}, {"key": "v1_2", "text": "y"}]), ShardConfig(), {})
    assert len(rows) == 2 and len({r.key for r in rows}) == 2 and rejects == []


def test_parquet_manifest(tmp_path):
    table = pa.table({"key": ["a", "b"], "text": ["hello", None], "image": [None, str(MINI / "images" / "horse.png")],
                      "label": ["animal", "animal"]})
    pq.write_table(table, tmp_path / "m.parquet")
    rows, rejects = read_manifest(str(tmp_path / "m.parquet"), ShardConfig(), {})
    assert [r.modalities for r in rows] == [("text",), ("image",)] and rejects == []


@pytest.mark.parametrize("prefix", ["file://", "memory://"])
def test_manifest_from_other_fsspec_urls(tmp_path, prefix):
    import fsspec

    line = json.dumps({"key": "h", "image": str(MINI / "images" / "horse.png"), "text": "a horse"}) + "\n"
    url = f"{prefix}{tmp_path}/m.jsonl" if prefix == "file://" else "memory://manifests/m.jsonl"
    with fsspec.open(url, "w") as f:
        f.write(line)
    rows, _ = read_manifest(url, ShardConfig(), {})
    assert rows[0].files["image"] == str(MINI / "images" / "horse.png")
