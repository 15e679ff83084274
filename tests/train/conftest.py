import pytest

from features.config import EmbedConfig
from features.stage import run_embed_stage
from preprocess.config import ShardConfig
from preprocess.stage import run_shard_stage
from tests.conftest import LABELS, MINI


@pytest.fixture(scope="package")
def embedded_mini(ray_session, tmp_path_factory):
    """The mini corpus sharded (3 shards) and embedded, as training reads it."""
    out = tmp_path_factory.mktemp("train-mini")
    run_shard_stage(str(MINI / "manifest.jsonl"), str(out), ShardConfig(labels=LABELS, samples_per_shard=16),
                    progress=False)
    run_embed_stage(str(out), EmbedConfig(), progress=False)
    return out
