import pytest

from tessera.core.errors import ConfigError
from tessera.preprocess.config import ShardConfig
from tessera.workflows.config import TesseraConfig, load_config
from tests.conftest import REPO


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


def test_exponent_numbers_are_numbers_as_yaml_12_reads_them(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` without a dot as a string; a config reads it as a number,
    in a field and in a search space alike (where nothing would coerce it)."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\ntune:\n  space:\n    train.lr: {choice: [3e-2, 1e-6]}\n"
                    "    train.weight_decay: {loguniform: [1E-5, 1.0e-1]}\n")
    cfg = load_config(path, ["train.weight_decay=2e-3"])
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 2e-3
    space = cfg.tune.model_dump()["space"]
    assert list(space["train.lr"]["choice"]) == [3e-2, 1e-6]
    assert list(space["train.weight_decay"]["loguniform"]) == [1e-5, 0.1]
    assert load_config(None, ["job.manifest=1e5x"]).job.manifest == "1e5x"  # (not a number: a string)


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


BOMB = "\n".join(['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
                  *(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)),
                  "shard:", "  labels: *i"]) + "\n"


def test_an_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path, capsys):
    from tessera.workflows.cli import main

    (tmp_path / "bomb.yaml").write_text(BOMB)  # 9 levels of 9 aliases: 9**9 strings once followed
    with pytest.raises(ConfigError, match=r"expands to 926,177,117 values \(YAML aliases followed\)"):
        load_config(tmp_path / "bomb.yaml")
    assert main(["status", str(tmp_path), "--config", str(tmp_path / "bomb.yaml")]) == 2
    assert len(capsys.readouterr().err) < 500


def test_what_an_error_quotes_of_a_value_is_bounded(tmp_path):
    (tmp_path / "long.yaml").write_text("shard:\n  samples_per_shard: " + "x" * 1_000_000 + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "long.yaml")
    assert "shard.samples_per_shard" in str(err.value) and len(str(err.value)) < 1000


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    (tmp_path / "twice.yaml").write_text("shard:\n  seed: 1\n  samples_per_shard: 8\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"key 'seed' is given twice \(lines 2 and 4\)"):
        load_config(tmp_path / "twice.yaml")
    # (a merge key's fields may be overridden: that is what it is for)
    (tmp_path / "merge.yaml").write_text("base: &b {seed: 1}\nshard:\n  <<: *b\n  seed: 2\n")
    with pytest.raises(ConfigError, match="base: Extra inputs"):
        load_config(tmp_path / "merge.yaml")


def test_a_heartbeat_that_does_not_renew_within_the_ttl_is_refused():
    for heartbeat, ttl in ((60, 60), (90, 60), (31, 60)):
        with pytest.raises(ConfigError, match="heartbeat_s .* must be at most half of ttl_s"):
            load_config(None, [f"runtime.lease.heartbeat_s={heartbeat}", f"runtime.lease.ttl_s={ttl}"])
    assert load_config(None, ["runtime.lease.heartbeat_s=30", "runtime.lease.ttl_s=60"]).runtime.lease.ttl_s == 60


def test_a_config_that_is_not_utf8_or_an_override_that_is_not_yaml_exits_2(tmp_path, capsys):
    from tessera.workflows.cli import main

    (tmp_path / "latin1.yaml").write_bytes("shard:\n  labels: [caf\xe9]\n".encode("latin-1"))
    assert main(["status", str(tmp_path), "--config", str(tmp_path / "latin1.yaml")]) == 2
    assert "latin1.yaml is not UTF-8 text (invalid continuation byte at byte 22)" in capsys.readouterr().err
    assert main(["status", str(tmp_path), "--set", "shard.labels=[a, b"]) == 2
    err = capsys.readouterr().err
    assert "--set shard.labels=[a, b is not valid YAML" in err and "Traceback" not in err
