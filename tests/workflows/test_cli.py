import json
import subprocess
import sys

from tests.conftest import REPO
from workflows.cli import EXIT_CONFIG, EXIT_CONFLICT, EXIT_NO_INPUT, main

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
    # ... found before any Ray: a driver pointed at no cluster at all still says so
    done = subprocess.run([sys.executable, "-m", "workflows", "shard", SAMPLE, str(tmp_path), "--config",
                           str(REPO / "configs" / "demo.yaml"), "--seed", "5", "--address", "127.0.0.1:9"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_CONFLICT and "fields changed: seed" in done.stderr

    # tessera status: the stages, then the lease a running process holds
    assert main(["status", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["kind"] == "shard output" and status["lease"] is None
    assert status["stages"]["shard"] == {**status["stages"]["shard"], "complete": True, "up_to_date": True}
    assert status["stages"]["embed"]["complete"] is False
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom preprocess.lease import Lease, LeaseConfig\nfrom preprocess.storage import Store\n"
        f"with Lease(Store({str(tmp_path)!r}), LeaseConfig(), 'tessera embed'):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["status", str(tmp_path), "--json"]) == 0
        lease = json.loads(capsys.readouterr().out)["lease"]
        assert lease["command"] == "tessera embed" and lease["pid"] == holder.pid and lease["host"]
    finally:
        holder.kill()


def test_bad_config_exits_before_any_work(tmp_path, capsys):
    code = main(["shard", SAMPLE, str(tmp_path / "out"), "--set", "shard.image.size=-1"])
    assert code == EXIT_CONFIG
    assert "shard.image.size: Input should be greater than 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inputs_that_are_not_there_or_not_what_a_command_reads_say_what_they_are(exported_mini, trained_mini,
                                                                              tmp_path, capsys):
    model, _ = exported_mini
    text = tmp_path / "a.txt"
    text.write_text("A caption.")
    for argv, code, said in [
        (["rejects", str(tmp_path / "nowhere")], EXIT_NO_INPUT, "is not a shard output"),
        (["versions", str(trained_mini)], EXIT_NO_INPUT, "is not a refresh output"),
        (["status", str(tmp_path / "nowhere")], EXIT_NO_INPUT, "holds nothing tessera wrote"),
        (["predict", str(trained_mini), str(text)], EXIT_NO_INPUT, "is a training run, not an export"),
        (["predict", str(tmp_path / "nowhere"), str(text)], EXIT_NO_INPUT, "tessera export RUN"),
        (["predict", str(model), str(text), "--variant", "pruned"], EXIT_CONFIG, "no 'pruned' model"),
        (["refresh", "a.yaml", "--config", "b.yaml"], EXIT_CONFIG, "two configs given"),
        (["shard", SAMPLE, str(tmp_path / "x"), "--set", "shard.seed=x"], EXIT_CONFIG, "[from --set shard.seed=x]"),
    ]:
        assert main(argv) == code, argv
        assert said in capsys.readouterr().err, argv
    assert not (tmp_path / "x").exists()


def test_export_says_what_it_wrote_without_onnxruntime_chatter(trained_mini, tmp_path):
    done = subprocess.run([sys.executable, "-m", "workflows", "export", str(trained_mini), str(tmp_path / "model"),
                           "--set", "export.prune_sparsity=0.5"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    assert "Quantization parameters" not in shown and "pre-processing before quantization" not in shown
    table = done.stderr  # stdout is not a terminal: the table on stderr, the records on stdout
    assert "x1.00 smaller" not in table and "gzipped" in table and "smaller)" in table
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["variant"] for r in records] == ["fp32", "int8", "pruned"]
