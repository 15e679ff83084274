"""The training stream: split by rank and loader worker, resumable, deterministic."""

from collections import Counter

import pytest

from train.data import DatasetInfo, StreamSpec, loader, split_of


def spec_for(info, rank, world=2, workers=2, batch=4, split="train", seed=0, image=None):
    return StreamSpec(info, split, 0.2, batch, 8, seed, image, rank, world, workers, 1)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k, w in zip(b["keys"], b["weights"].tolist(), strict=True) if w > 0]


def test_split_by_key_hash_is_stable_and_disjoint():
    keys = [f"k{i}" for i in range(1000)]
    val = {k for k in keys if split_of(k, 0.2) == "val"}
    assert 150 < len(val) < 250
    assert val == {k for k in keys if split_of(k, 0.2) == "val"}


def test_one_epoch_over_two_ranks_and_two_loader_workers_sees_every_sample_once(embedded_mini):
    info = DatasetInfo.read(str(embedded_mini), ("text", "image", "audio", "video"), 0.2)
    train_keys = {k for k in _all_keys(embedded_mini) if split_of(k, 0.2) == "train"}
    seen, sizes = [], set()
    for rank in range(2):
        batches = list(loader(spec_for(info, rank), epoch=0))  # real DataLoader worker processes
        sizes.add(len(batches))
        assert all(len(b["keys"]) == 4 for b in batches)
        seen += keys_of(batches)
    assert len(sizes) == 1  # every rank runs the same number of steps
    counts = Counter(seen)
    assert set(counts) == train_keys and set(counts.values()) == {1}
    assert info.counts["train"] == len(train_keys)


def test_epochs_reshuffle_and_seeds_repeat(embedded_mini):
    info = DatasetInfo.read(str(embedded_mini), ("text", "image"), 0.2)
    first = keys_of(loader(spec_for(info, 0, workers=1), 0))
    assert first == keys_of(loader(spec_for(info, 0, workers=1), 0))
    assert first != keys_of(loader(spec_for(info, 0, workers=1), 1))
    assert set(first) == set(keys_of(loader(spec_for(info, 0, workers=1), 1)))


@pytest.mark.parametrize("start", [1, 2, 3])
def test_resuming_mid_epoch_continues_with_the_same_batches(embedded_mini, start):
    info = DatasetInfo.read(str(embedded_mini), ("text", "image", "audio"), 0.2)
    spec = spec_for(info, 1, batch=2)
    whole = [b["keys"] for b in loader(spec, 0)]
    resumed = [b["keys"] for b in loader(spec, 0, start=start)]
    assert resumed == whole[start:]


def test_pixels_for_the_image_branch(embedded_mini):
    info = DatasetInfo.read(str(embedded_mini), ("text",), 0.2)
    batch = next(iter(loader(spec_for(info, 0, workers=1, image=32), 0)))
    assert batch["pixels"].shape == (4, 3, 32, 32)
    assert abs(float(batch["pixels"].mean())) < 1.5  # normalized with the shard statistics


def _all_keys(out):
    import pyarrow.parquet as pq

    return [r["key"] for r in pq.read_table(out / "index.parquet").to_pylist()]


def test_one_stream_spans_epochs_from_a_resumed_position(embedded_mini):
    info = DatasetInfo.read(str(embedded_mini), ("text", "image"), 0.2)
    spec = spec_for(info, 0, batch=2)
    epochs = [[b["keys"] for b in loader(spec, e)] for e in range(3)]
    assert [b["keys"] for b in loader(spec, 0, last_epoch=3)] == epochs[0] + epochs[1] + epochs[2]
    assert [b["keys"] for b in loader(spec, 1, start=3, last_epoch=3)] == epochs[1][3:] + epochs[2]
