"""Target fields besides `label` (multi-task training): checked like `label`, a bad value is a
reject line naming the field, a missing one only masks its task; recorded in the index."""

import json
import tarfile

import pytest
from pydantic import ValidationError

from tessera.core.storage import Store
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.stage import run_shard_stage
from tests.conftest import index_rows, reject_rows

TARGETS = [{"field": "sentiment", "kind": "classification", "labels": ["negative", "positive"]},
           {"field": "score", "kind": "regression"},
           {"field": "tags", "kind": "multilabel", "labels": ["cat", "dog", "outdoor"]}]


def test_target_values_are_checked_and_recorded(ray_session, tmp_path):
    rows = [
        {"key": "full", "text": "a", "sentiment": "positive", "score": 3, "tags": ["outdoor", "dog"], "source": "x"},
        {"key": "no-sentiment", "text": "b", "score": 0.5, "tags": []},
        {"key": "nothing", "text": "c"},
        {"key": "bad-class", "text": "d", "sentiment": "meh"},
        {"key": "bad-number", "text": "e", "score": "high"},
        {"key": "nan", "text": "f", "score": float("nan")},
        {"key": "bad-tags", "text": "g", "tags": "dog"},
        {"key": "unknown-tag", "text": "h", "tags": ["dog", "bird"]},
        {"key": "repeated-tag", "text": "i", "tags": ["dog", "dog"]},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    summary = run_shard_stage(str(manifest), Store(str(out)), ShardConfig(targets=TARGETS, max_reject_fraction=None),
                              progress=False)
    assert summary.accepted == 3
    reasons = {r["key"]: r["reason"] for r in reject_rows(out)}
    assert reasons == {
        "bad-class": "target sentiment: 'meh' is not in its label set",
        "bad-number": "target score: 'high' is not a finite number",
        "nan": "target score: nan is not a finite number",
        "bad-tags": "target tags: expected a list of labels, got str",
        "unknown-tag": "target tags: 'bird' is not in its label set",
        "repeated-tag": "target tags: a label is repeated in ['dog', 'dog']",
    }
    recorded = {r["key"]: r["targets"] and json.loads(r["targets"]) for r in index_rows(out)}
    assert recorded == {"full": {"sentiment": "positive", "score": 3.0, "tags": ["dog", "outdoor"]},
                        "no-sentiment": {"score": 0.5, "tags": []}, "nothing": None}
    with tarfile.open(out / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("full.json").read())
    assert meta["targets"]["sentiment"] == "positive" and meta["metadata"] == {"source": "x"}


@pytest.mark.parametrize("targets, message", [
    ([{"field": "label", "kind": "classification"}], "a manifest field of its own"),
    ([{"field": "score", "kind": "regression", "labels": ["a"]}], "takes no labels"),
    ([{"field": "s", "kind": "regression"}, {"field": "s", "kind": "classification"}], "each field once"),
    ([{"field": "s", "kind": "ranking"}], "classification"),
])
def test_bad_target_definitions_are_refused_up_front(targets, message):
    with pytest.raises(ValidationError, match=message):
        ShardConfig(targets=targets)
