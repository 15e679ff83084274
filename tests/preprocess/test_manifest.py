import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.core.storage import Store
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.manifest import LineReject, ManifestSource, chunks, iter_manifest, read_chunk
from tests.conftest import LABELS, MINI

LOCAL = Store("/")  # reaches every local path


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def read_manifest(url, cfg, rows_per_chunk=4096):
    items = list(iter_manifest(url, cfg, LOCAL, rows_per_chunk=rows_per_chunk))
    return [r for r in items if not isinstance(r, LineReject)], [r for r in items if isinstance(r, LineReject)]


def test_mini_manifest_rows_resolve_relative_paths():
    rows, rejects = read_manifest(str(MINI / "manifest.jsonl"), ShardConfig(labels=LABELS))
    assert len(rows) == 43 and rejects == []
    astronaut = rows[0]
    assert astronaut.files["image"] == str(MINI / "images" / "astronaut.png")
    assert astronaut.modalities == ("image", "text", "audio", "video") and astronaut.file == "manifest.jsonl"
    note = next(r for r in rows if r.key == "note-only")
    assert note.modalities == ("text",) and note.files == {}


def test_row_checks(tmp_path):
    lines = [
        {"key": "a", "text": "x", "label": "cat", "source": "crawl-7"},
        {"text": "no key"},
        {"key": "b", "label": "cat"},
        {"key": "c", "text": "x", "label": 3},
        {"key": "d", "text": 5},
        [1, 2],
        "{broken",
        {"key": "e", "image": "img/e.jpg", "label": "dog"},
        {"key": "  ", "text": "blank key"},
    ]
    rows, rejects = read_manifest(write_jsonl(tmp_path / "m.jsonl", lines), ShardConfig())
    assert [r.key for r in rows] == ["a", "e"]
    assert rows[0].metadata == {"source": "crawl-7"}
    assert rows[1].files["image"] == str(tmp_path / "img" / "e.jpg")
    assert {r.line: r.code for r in rejects} == {2: "key.missing", 3: "sample.no_modality", 4: "label.wrong_type",
                                                 5: "text.wrong_type", 6: "manifest.not_object",
                                                 7: "manifest.not_json", 9: "key.missing"}
    got = {r.line: (r.key, r.modality, r.reason) for r in rejects}
    assert got[2][2].startswith("key is missing")
    assert got[3] == ("b", None, "sample has no modality")
    assert got[4] == ("c", "label", "label has the wrong type int, expected str")
    assert got[5][1:] == ("text", "text has the wrong type int, expected a string")
    assert got[6] == (None, None, "manifest line is a list, not an object")
    assert got[7][0] is None and got[7][2].startswith("manifest line is not valid JSON")
    assert "column" not in got[7][2] and "at character" in got[7][2]  # one line number: the reject's
    assert got[9][2] == "key is empty"


def test_label_set_and_required_modalities(tmp_path):
    lines = [{"key": "a", "text": "x", "label": "cat"}, {"key": "b", "text": "x", "label": "person"}]
    cfg = ShardConfig(labels=LABELS, required_modalities=("text",))
    rows, rejects = read_manifest(write_jsonl(tmp_path / "m.jsonl", lines), cfg)
    assert [r.key for r in rows] == ["b"] and rejects[0].reason == "label 'cat' is not in the label set"
    cfg = ShardConfig(required_modalities=("image",))
    rows, rejects = read_manifest(str(tmp_path / "m.jsonl"), cfg)
    assert rows == [] and {r.reason for r in rejects} == {"required modality image is missing"}


def test_keys_that_collide_after_making_them_safe_are_not_confused(tmp_path):
    rows, rejects = read_manifest(write_jsonl(tmp_path / "m.jsonl", [
        {"key": "v1.2", "text": "x"}, {"key": "v1_2", "text": "y"}]), ShardConfig())
    assert len(rows) == 2 and len({r.key for r in rows}) == 2 and rejects == []


def test_parquet_manifest(tmp_path):
    table = pa.table({"key": ["a", "b"], "text": ["hello", None], "image": [None, str(MINI / "images" / "horse.png")],
                      "label": ["animal", "animal"]})
    pq.write_table(table, tmp_path / "m.parquet")
    rows, rejects = read_manifest(str(tmp_path / "m.parquet"), ShardConfig(inputs={"allow": [str(MINI)]}))
    assert [r.modalities for r in rows] == [("text",), ("image",)] and rejects == []


@pytest.mark.parametrize("prefix", ["file://", "memory://"])
def test_manifest_from_other_fsspec_urls(tmp_path, prefix):
    import fsspec

    line = json.dumps({"key": "h", "image": str(MINI / "images" / "horse.png"), "text": "a horse"}) + "\n"
    url = f"{prefix}{tmp_path}/m.jsonl" if prefix == "file://" else "memory://manifests/m.jsonl"
    with fsspec.open(url, "w") as f:
        f.write(line)
    rows, _ = read_manifest(url, ShardConfig(inputs={"allow": [str(MINI)]}))
    assert rows[0].files["image"] == str(MINI / "images" / "horse.png")


def test_jsonl_chunks_cut_at_line_boundaries_and_keep_line_numbers(tmp_path, monkeypatch):

    monkeypatch.setattr("tessera.preprocess.manifest.SCAN_BLOCK", 64)  # many blocks: cuts fall inside and across them
    lines = [json.dumps({"key": f"k{i}", "text": "x" * (i % 7)}) for i in range(1, 41)]
    lines[9] = ""  # a blank line is a line (numbering follows the file) but not a row
    path = tmp_path / "m.jsonl"
    path.write_bytes(("\r\n".join(lines)).encode())  # CRLF, no newline at the end
    source = ManifestSource.open(str(path), LOCAL)
    cut = list(chunks(source, 7))
    assert [c.first_line for c in cut] == [1, 8, 15, 22, 29, 36]
    assert [(a.stop, b.start) for a, b in zip(cut, cut[1:], strict=False)] == [(a.stop, a.stop) for a in cut[:-1]]
    assert cut[0].start == 0 and cut[-1].stop == path.stat().st_size
    got = [(line, obj["key"]) for c in cut for line, obj in read_chunk(c)]
    assert got == [(i, f"k{i}") for i in range(1, 41) if i != 10]


def test_parquet_chunks_read_only_their_rows_across_row_groups(tmp_path):
    table = pa.table({"key": [f"k{i}" for i in range(1, 101)], "text": ["t"] * 100})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=9)
    cut = list(chunks(ManifestSource.open(str(tmp_path / "m.parquet"), LOCAL), 25))
    assert [(c.start, c.stop, c.first_line) for c in cut] == [(0, 25, 1), (25, 50, 26), (50, 75, 51), (75, 100, 76)]
    assert [(line, obj["key"]) for c in cut for line, obj in read_chunk(c)] == [(i, f"k{i}") for i in range(1, 101)]


def test_a_folder_or_glob_of_jsonl_and_parquet_parts_is_one_manifest(tmp_path):
    folder = tmp_path / "parts"
    (folder / "b").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [{"key": "a1", "text": "x"}, {"key": "a2", "text": "y"}])
    pq.write_table(pa.table({"key": ["b1", "b2"], "text": ["u", "v"]}), folder / "b" / "part-0.parquet")
    write_jsonl(folder / "c.jsonl", [{"key": "c1", "text": "z"}])
    (folder / "README.md").write_text("not a manifest")
    source = ManifestSource.open(str(folder), LOCAL)
    assert [f.name for f in source.files] == ["a.jsonl", "b/part-0.parquet", "c.jsonl"]
    rows, _ = read_manifest(str(folder), ShardConfig())
    assert [(r.file, r.line, r.key) for r in rows] == [("a.jsonl", 1, "a1"), ("a.jsonl", 2, "a2"),
                                                       ("b/part-0.parquet", 1, "b1"), ("b/part-0.parquet", 2, "b2"),
                                                       ("c.jsonl", 1, "c1")]
    assert [f.name for f in ManifestSource.open(str(folder / "*.jsonl"), LOCAL).files] == ["a.jsonl", "c.jsonl"]
    before = source.fingerprint
    os.utime(folder / "c.jsonl", ns=(0, 0))  # same size, another mtime: the file may have changed
    assert ManifestSource.open(str(folder), LOCAL).fingerprint != before
    with pytest.raises(FileNotFoundError, match="no manifest"):
        ManifestSource.open(str(folder / "b" / "*.jsonl"), LOCAL)


HOSTILE = {
    "deep": '{"key": "deep", "text": "x", "m": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "digits": '{"key": "digits", "text": "x", "n": ' + "7" * 5000 + "}",
    "surrogate key": '{"key": "\\ud800", "text": "x"}',
    "surrogate text": '{"key": "lone", "text": "a \\udfff b"}',
}


def test_hostile_lines_are_rejects_of_their_own_line(tmp_path):
    """A line nested 100,000 deep, an integer of 5,000 digits, a lone surrogate in a key or a
    caption: each one reject for its line, the good lines around them rows."""
    good = [{"key": "a", "text": "fine"}, {"key": "pair", "text": "\U0001f600 is a pair: \\ud83d\\ude00"}]
    manifest = write_jsonl(tmp_path / "m.jsonl", [good[0], *HOSTILE.values(), good[1]])
    rows, rejects = read_manifest(manifest, ShardConfig())
    assert [r.key for r in rows] == ["a", "pair"]
    assert {r.line: r.code for r in rejects} == {2: "manifest.too_deep", 3: "manifest.number_too_long",
                                                 4: "manifest.lone_surrogate", 5: "manifest.lone_surrogate"}
    reasons = {r.line: r.reason for r in rejects}
    assert reasons == {2: "manifest line is nested too deeply",
                       3: "manifest line holds an integer of 5000 digits, over 4300",
                       4: "manifest line holds a lone UTF-16 surrogate (\\ud800): not a character",
                       5: "manifest line holds a lone UTF-16 surrogate (\\udfff): not a character"}


def test_metadata_is_kept_as_json_and_bounded(tmp_path):
    lines = [{"key": "nan", "text": "x", "score": float("nan"), "spread": [1.5, float("inf")]},
             {"key": "big", "text": "x", "blob": "z" * 2000},
             {"key": "nested", "text": "x", "source": {"crawl": 7, "tags": ["a", "b"]}}]
    rows, rejects = read_manifest(write_jsonl(tmp_path / "m.jsonl", lines), ShardConfig(max_metadata_bytes=1000))
    assert {r.key: r.metadata for r in rows} == {"nan": {"score": None, "spread": [1.5, None]},
                                                 "nested": {"source": {"crawl": 7, "tags": ["a", "b"]}}}
    assert [r.reason for r in rejects] == ["metadata is 2012 bytes, over shard.max_metadata_bytes (1000)"]


def test_parquet_metadata_columns_of_any_type_are_kept(tmp_path):
    import datetime
    import decimal

    table = pa.table({
        "key": ["a", "b"], "text": ["one", "two"],
        "created_at": pa.array([datetime.datetime(2026, 1, 2, 3, 4, 5), None], pa.timestamp("us")),
        "day": pa.array([datetime.date(2026, 1, 2)] * 2, pa.date32()),
        "price": pa.array([decimal.Decimal("1.10"), decimal.Decimal("-3.25")], pa.decimal128(5, 2)),
        "raw": pa.array([b"\x00\xff", b"ok"], pa.binary()),
        "took": pa.array([datetime.timedelta(seconds=90), None], pa.duration("s")),
        "score": pa.array([float("nan"), 0.5], pa.float64()),
    })
    pq.write_table(table, tmp_path / "m.parquet")
    rows, rejects = read_manifest(str(tmp_path / "m.parquet"), ShardConfig())
    assert rejects == []
    assert rows[0].metadata == {"created_at": "2026-01-02T03:04:05", "day": "2026-01-02", "price": "1.10",
                                "raw": "AP8=", "took": 90.0, "score": None}
    assert rows[1].metadata == {"day": "2026-01-02", "price": "-3.25", "raw": "b2s=", "score": 0.5}
    json.dumps(rows[0].metadata, allow_nan=False)  # what each sample's json holds: JSON


def test_a_parquet_name_on_a_file_that_is_not_parquet_is_refused_naming_it(tmp_path):
    (tmp_path / "parts").mkdir()
    pq.write_table(pa.table({"key": ["a"], "text": ["x"]}), tmp_path / "parts" / "a.parquet")
    (tmp_path / "parts" / "b.parquet").write_text('{"key": "b", "text": "not parquet"}\n')
    with pytest.raises(FileNotFoundError, match=r"parts/b.parquet is not a Parquet file"):
        ManifestSource.open(str(tmp_path / "parts"), LOCAL)
