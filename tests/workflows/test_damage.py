"""Damaged outputs: a committed tar cut to half, an index part deleted, a sidecar overwritten.
`tessera status` says so, embedding and training refuse to start naming the files, and the
stage that wrote them writes them again (the tar byte for byte, the sidecar from the cache)."""

import pytest

from tessera.core.errors import DamagedOutput
from tessera.core.storage import Store
from tessera.features.config import EmbedConfig
from tessera.features.stage import run_embed_stage
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.layout import read_sizes
from tessera.preprocess.stage import run_shard_stage
from tessera.train.data import DatasetInfo
from tessera.workflows.status import folder_status
from tests.conftest import LABELS, REPO

SAMPLE = REPO / "workflows" / "sample_corpus" / "manifest.jsonl"
TEXT_ONLY = EmbedConfig(image=None, audio=None, video=None, cpus_per_actor=1)


@pytest.mark.slow
def test_damaged_files_are_found_refused_and_written_again(ray_session, tmp_path):
    out = Store(str(tmp_path / "out"))
    cfg = ShardConfig(labels=LABELS, samples_per_shard=4)
    run_shard_stage(str(SAMPLE), out, cfg, progress=False)
    run_embed_stage(out, TEXT_ONLY, progress=False)
    tar, part, sidecar = (tmp_path / "out" / name for name in
                          ("shard-000001.tar", "index/shard-000002.parquet", "shard-000003.emb.parquet"))
    whole = tar.read_bytes()
    tar.write_bytes(whole[: len(whole) // 2])
    part.unlink()
    sidecar.write_bytes(b"garbage" * 100)

    stages = folder_status(out)["stages"]
    assert not stages["shard"]["up_to_date"] and not stages["embed"]["up_to_date"]
    assert stages["shard"]["damaged"] == ["index/shard-000002.parquet (missing)",
                                          f"shard-000001.tar ({len(whole) // 2} bytes, committed as {len(whole)})"]
    committed = read_sizes(out)["shard-000003.emb.parquet"]
    assert stages["embed"]["damaged"] == [f"shard-000003.emb.parquet (700 bytes, committed as {committed})"]
    with pytest.raises(DamagedOutput, match=r"2 committed files are damaged: index/shard-000002.parquet .*"
                                            r"shard-000001.tar .*`tessera shard`"):
        run_embed_stage(out, TEXT_ONLY, progress=False)
    with pytest.raises(DamagedOutput, match="3 committed files are damaged"):
        DatasetInfo.read(out, ("text",), 0.2)

    again = run_shard_stage(str(SAMPLE), out, cfg, progress=False)  # writes the two shards again
    assert not again.up_to_date and again.resumed_shards == again.shards - 2 and again.accepted == 17
    assert tar.read_bytes() == whole and part.exists()
    embedded = run_embed_stage(out, TEXT_ONLY, progress=False)  # the sidecar again, from the cache
    assert embedded.sidecars_written == 1 and embedded.computed == 0
    stages = folder_status(out)["stages"]
    assert stages["shard"]["up_to_date"] and stages["embed"]["up_to_date"]
    assert not stages["shard"]["damaged"] and not stages["embed"]["damaged"]
    assert DatasetInfo.read(out, ("text",), 0.0).counts["all"] == 17
