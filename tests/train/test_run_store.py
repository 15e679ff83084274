"""What a training run keeps in its store: checkpoints (the store is the truth, `latest` is
checked before it becomes a path) and metrics.jsonl (cut back to the checkpoint on resume)."""

import json

import pytest

from tessera.core.storage import Store
from tessera.train.layout import LATEST, METRICS
from tessera.train.run_store import Checkpoints, MetricsLog, scratch_for, tag_of


@pytest.mark.parametrize("tag", ["../../etc", "step-0000001/../../x", "/abs/path", "latest", ""])
def test_a_latest_that_is_not_a_tag_is_refused(tmp_path, tag):
    store = Store(str(tmp_path / "checkpoints"))
    store.write_bytes(LATEST, tag.encode())
    with pytest.raises(ValueError, match="not a checkpoint tag"):
        Checkpoints(store).latest()


def test_checkpoint_tags_are_ordered_by_step_past_ten_million(tmp_path):
    store = Store(str(tmp_path / "checkpoints"))
    for step in (9_999_999, 10_000_000):
        store.write_bytes(f"{tag_of(step)}/part", b"x")
    Checkpoints(store).commit(tag_of(10_000_000), keep=1)  # (as strings, step-10000000 < step-9999999)
    assert store.names("step-*") == ["step-10000000"] and Checkpoints(store).latest() == "step-10000000"


def test_a_node_pulls_the_files_it_lacks_and_forgets_a_run_the_store_lost(s3_options, tmp_path):
    import s3fs

    s3fs.S3FileSystem(**s3_options["s3"]).mkdir("ckpt")
    store = Store("s3://ckpt/run-a", s3_options)
    writer = Checkpoints(store)
    (writer.local / "step-0000004").mkdir(parents=True)
    for rank in (0, 1):
        (writer.local / "step-0000004" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(b"rank %d" % rank)
    writer.push("step-0000004")
    writer.commit("step-0000004", keep=2)
    writer.clear_scratch()

    other_node = Checkpoints(store)  # same URL, empty scratch (another machine)
    assert other_node.prepare() == "step-0000004"
    assert (other_node.local / "step-0000004" / "zero_pp_rank_1_optim_states.pt").read_bytes() == b"rank 1"
    assert not list(other_node.local.rglob("*.part"))

    store.remove("", recursive=True)  # the run is gone from the store: the scratch copy is not used
    assert other_node.prepare() is None and not scratch_for(store.url).exists()


def test_metrics_are_cut_back_to_the_checkpoint_on_resume(tmp_path):
    run = Store(str(tmp_path / "run"))
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]
    records.insert(8, {"epoch": 0, "step": 8, "val_loss": 0.5})  # a validation record: not a step
    run.write_bytes(METRICS, "".join(json.dumps(r) + "\n" for r in records).encode())
    log = MetricsLog(run, resumed_step=6)
    log.write({"step": 7, "loss": 0.5})
    log.close()
    records = [json.loads(line) for line in run.read_bytes(METRICS).decode().splitlines()]
    assert [r.get("step") for r in records] == [1, 2, 3, 4, 5, 6, None, 7]
    assert records[6] == {"resumed_at": 6, "steps_redone": 4}  # steps 7-10 (the validation record is no step)
