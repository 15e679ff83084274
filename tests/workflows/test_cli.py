import json

from tests.conftest import REPO
from workflows.cli import EXIT_CONFIG, EXIT_CONFLICT, main

SAMPLE = str(REPO / "workflows" / "sample_corpus" / "manifest.jsonl")


def test_shard_command_prints_counts(ray_session, tmp_path, capsys):
    code = main(["shard", SAMPLE, str(tmp_path), "--config", str(REPO / "configs" / "demo.yaml"),
                 "--no-progress"])
    assert code == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["inputs"] == 17 and counts["accepted"] == 16 and counts["shards"] == 3
    # the demo config drops near copies: moon-silent shows moon's picture again
    assert json.loads((tmp_path / "summary.json").read_text())["rejected_by_reason"] == {"image: near-duplicate": 1}
    code = main(["shard", SAMPLE, str(tmp_path), "--config", str(REPO / "configs" / "demo.yaml"),
                 "--seed", "5", "--no-progress"])
    assert code == EXIT_CONFLICT and "fields changed: seed" in capsys.readouterr().err


def test_bad_config_exits_before_any_work(tmp_path, capsys):
    code = main(["shard", SAMPLE, str(tmp_path / "out"), "--set", "shard.image.size=-1"])
    assert code == EXIT_CONFIG
    assert "shard.image.size: Input should be greater than 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
