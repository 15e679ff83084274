import pytest

from preprocess.config import ShardConfig
from tests.conftest import REPO
from workflows.config import ConfigError, TesseraConfig, load_config


def test_checked_in_configs_validate():
    assert load_config(REPO / "configs" / "default.yaml") == TesseraConfig()
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.shard.image.augment.random_resized_crop and demo.shard.labels
    cluster = load_config(REPO / "configs" / "cluster-job.yaml")
    assert cluster.job.out.startswith("s3://") and cluster.train.checkpoint_url


def test_errors_name_the_field_and_the_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("shard:\n  samples_per_shard: 0\n  image:\n    qualty: 80\n  audio:\n    normalize: loud\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "shard.samples_per_shard: Input should be greater than 0 (got 0)" in message
    assert "shard.image.qualty: Extra inputs are not permitted" in message
    assert "shard.audio.normalize" in message and "'loud'" in message


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="crop_scale must satisfy"):
        load_config(None, ["shard.image.augment.crop_scale=[0.9, 0.5]"])


def test_overrides_are_typed_and_validated():
    cfg = load_config(None, ["shard.image.size=128", "shard.labels=[a, b]", "runtime.workers=4"])
    assert cfg.shard.image.size == 128 and cfg.shard.labels == ("a", "b") and cfg.runtime.workers == 4
    with pytest.raises(ConfigError, match="expects section.field=value"):
        load_config(None, ["shard.image.size"])


def test_unreadable_or_non_mapping_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_digest_ignores_nothing_that_changes_bytes():
    base = ShardConfig()
    assert base.digest() == ShardConfig().digest()
    assert base.digest() != ShardConfig(seed=1).digest()
    assert base.digest() != ShardConfig(image={"quality": 80}).digest()
