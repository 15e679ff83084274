"""Curation on embeddings: semantic duplicates by cosine within k-means clusters (connected
groups, earliest row kept), outliers far from their centroid — on vectors built by hand."""

import json

import numpy as np

from tessera.core.storage import Store
from tessera.features.config import CurateConfig, EmbedConfig
from tessera.features.curate import run_curate_stage
from tessera.features.layout import OUTLIERS, CurateSummary, EmbedSummary
from tessera.features.sidecar import ShardRows, write_sidecar
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.layout import read_index
from tessera.preprocess.stage import run_shard_stage
from tessera.workflows.cli import EXIT_CONFIG, main
from tessera.workflows.report import curation_plots
from tests.conftest import MINI, reject_rows

# text vectors of the text-only rows t1..t7, and cosines worked out by hand (eps 0.05: a pair
# is a duplicate at cosine >= 0.95)
VECTORS = {
    "t1": [1, 0, 0, 0],
    "t2": [0.99, 0.141, 0, 0],  # |t2| = 1.0000: cos(t1, t2) = 0.99 -> duplicate of t1
    "t3": [0.9, 0.436, 0, 0],  # |t3| = 1.0000: cos(t1, t3) = 0.90, but cos(t2, t3) = 0.891 + 0.061 = 0.95
    "t4": [0, 1, 0, 0],  # cos(t3, t4) = 0.44: stays
    "t5": [0, 0, 1, 0],
    "t6": [0, 0, 0.96, 0.28],  # |t6| = 1: cos(t5, t6) = 0.96 -> duplicate of t5
    "t7": [0, 0, 0, 1],  # cos(t6, t7) = 0.28: stays
    "photo": [1, 0, 0, 0],  # the caption of an image sample, t1's vector: not compared by default
}


def embedded_by_hand(tmp_path, ray_session, vectors: dict, folder: str = "shards") -> Store:
    """A text corpus sharded by the shard stage into tmp_path/FOLDER, its sidecars written
    from VECTORS (by key)."""
    manifest = tmp_path / f"{folder}-manifest"
    manifest.mkdir()
    (manifest / "horse.png").write_bytes((MINI / "images" / "horse.png").read_bytes())
    rows = [{"key": k, "text": f"caption of {k}"} if k != "photo" else
            {"key": k, "text": "stock photo", "image": "horse.png"} for k in vectors]
    (manifest / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = Store(str(tmp_path / folder))
    summary = run_shard_stage(str(manifest / "manifest.jsonl"), shards, ShardConfig(samples_per_shard=3),
                              progress=False)
    cfg = EmbedConfig(image=None, audio=None, video=None)
    for shard in [f"shard-{i:06d}.tar" for i in range(summary.shards)]:
        rows = ShardRows.read(shards, shard, ["text"])
        by_hash = {h: np.asarray(vectors[k], np.float32) for k, h in zip(rows.keys, rows.payloads["text"], strict=True)}
        write_sidecar(shards, shard, rows, {"text": by_hash}, {"text": 4}, {"text": "hand"}, "by-hand", cfg)
    EmbedSummary(samples=len(vectors), shards=summary.shards, sidecars_written=summary.shards, sidecars_up_to_date=0,
                 encoders={"text": "hand"}, config=cfg.model_dump(mode="json"), dims={"text": 4},
                 modalities={"text": {"samples": len(vectors), "computed": len(vectors)}}, computed=len(vectors),
                 cache_hits=0).write(shards)
    return shards


def test_semantic_duplicates_are_connected_groups_and_the_earliest_row_stays(tmp_path, ray_session, capsys):
    shards = embedded_by_hand(tmp_path, ray_session, VECTORS)
    cfg = CurateConfig(semantic={"modalities": ["text"], "eps": 0.05, "clusters": 1}, block_rows=3)
    summary = run_curate_stage(shards, cfg, progress=False)
    dropped = {r["sample_key"]: r["reason"] for r in reject_rows(tmp_path / "shards")}
    assert dropped == {"t2": "semantic duplicate of 't1' (text cosine 0.99)",
                       "t3": "semantic duplicate of 't1' (text cosine 0.95)",  # through t2
                       "t6": "semantic duplicate of 't5' (text cosine 0.96)"}
    # every reader but embedding and curation skips them; the image sample's caption was not compared
    assert sorted(read_index(shards, ["key"]).column("key").to_pylist()) == ["photo", "t1", "t4", "t5", "t7"]
    assert summary.semantic_duplicates == {"text": 3} and summary.clusters == {"text": 1}
    # each compared row's highest cosine: t1 0.99, t2 0.99, t3 0.95, t4 0.44, t5 0.96, t6 0.96, t7 0.28
    unit = {k: np.asarray(v) / np.linalg.norm(v) for k, v in VECTORS.items() if k != "photo"}
    highest = [max(unit[k] @ unit[o] for o in unit if o != k) for k in unit]
    assert np.round(highest, 2).tolist() == [0.99, 0.99, 0.95, 0.44, 0.96, 0.96, 0.28]
    assert summary.histogram["text"] == np.histogram(highest, bins=50, range=(-1, 1))[0].tolist()
    assert run_curate_stage(shards, cfg, progress=False).up_to_date

    # with the captions of media compared too, the photo's caption is t1's copy; a wider eps
    # joins t3 and t4 (cosine 0.44 >= 1 - 0.6)
    wider = CurateConfig(semantic={"modalities": ["text"], "eps": 0.6, "clusters": 1, "with_media": True})
    run_curate_stage(shards, wider, progress=False)
    dropped = {r["sample_key"] for r in reject_rows(tmp_path / "shards")}
    assert dropped == {"t2", "t3", "t4", "t6", "photo"}  # t7 (0.28 from t6) stays; earlier marks redone
    assert sorted(read_index(shards, ["key"]).column("key").to_pylist()) == ["t1", "t5", "t7"]
    # the report draws the histogram and the pairs, their texts read back from the tars
    assert [title for title, _ in curation_plots(shards)] == ["text: highest within-cluster cosine",
                                                              "text: semantic duplicates"]

    # the command: the same settings are up to date; no modality set is a config error
    args = ["--set", "curate.semantic.modalities=[text]", "--set", "curate.semantic.eps=0.6", "--set",
            "curate.semantic.clusters=1", "--set", "curate.semantic.with_media=true", "--no-progress"]
    assert main(["curate", str(tmp_path / "shards"), *args]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["up_to_date"]
    assert main(["curate", str(tmp_path / "shards")]) == EXIT_CONFIG
    assert "curate.semantic.modalities" in capsys.readouterr().err


def test_outliers_are_listed_by_their_robust_score_and_dropped_when_asked(tmp_path, ray_session):
    rng = np.random.default_rng(0)
    close = {f"t{i}": [1, *(rng.normal(0, 0.05, 3))] for i in range(1, 12)}
    vectors = {**close, "far": [0, 0, 1, 0]}
    shards = embedded_by_hand(tmp_path, ray_session, vectors)
    cfg = CurateConfig(outliers={"modalities": ["text"]}, semantic={"clusters": 1})
    summary = run_curate_stage(shards, cfg, progress=False)
    listed = shards.read_parquet(OUTLIERS).to_pylist()
    assert [(r["sample_key"], r["modality"]) for r in listed] == [("far", "text")] and listed[0]["score"] > 3.5
    assert summary.outliers == {"text": 1} and not reject_rows(tmp_path / "shards")  # listed, not dropped
    dropping = CurateConfig(outliers={"modalities": ["text"], "drop": True}, semantic={"clusters": 1})
    run_curate_stage(shards, dropping, progress=False)
    [reject] = reject_rows(tmp_path / "shards")
    assert reject["sample_key"] == "far" and reject["reason"].startswith("outlier (text score ")
    assert reject["reason"].endswith(", over curate.outliers.bound 3.5)")
    assert CurateSummary.read(shards).outliers_dropped
    assert "text: outliers" in [title for title, _ in curation_plots(shards)]


def test_a_versions_rows_are_compared_with_the_live_rows_of_earlier_versions(tmp_path, ray_session):
    cfg = CurateConfig(semantic={"modalities": ["text"], "eps": 0.05, "clusters": 1})
    first = embedded_by_hand(tmp_path, ray_session, {k: v for k, v in VECTORS.items() if k != "photo"}, "v000001")
    run_curate_stage(first, cfg, progress=False)  # drops t2, t3, t6 there
    second = embedded_by_hand(tmp_path, ray_session, {
        "u1": [0.99, 0.141, 0, 0],  # t2's vector: t2 is dropped in v000001, its live twin is t1 (cosine 0.99)
        "u2": [0.5, 0, 0, 0.866],  # cos(t1, u2) = 0.5, cos(t7, u2) = 0.87: new
        "u3": [0.5, 0, 0, 0.87],  # cos(u2, u3) = 1.00: a duplicate within this version
    }, "v000002")
    summary = run_curate_stage(second, cfg, progress=False, earlier=[first])
    dropped = {r["sample_key"]: r["reason"] for r in reject_rows(tmp_path / "v000002")}
    assert dropped == {"u1": "semantic duplicate of 't1' of version v000001 (text cosine 0.99)",
                       "u3": "semantic duplicate of 'u2' (text cosine 1.0)"}
    assert summary.semantic_duplicates == {"text": 2}
    # the earlier version is read, never changed
    assert {r["sample_key"] for r in reject_rows(tmp_path / "v000001")} == {"t2", "t3", "t6"}
    assert run_curate_stage(second, cfg, progress=False, earlier=[first]).up_to_date
