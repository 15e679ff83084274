"""tessera predict: the shard stage's preprocessing and the embedding stage's encoders on raw
inputs give the probabilities evaluation computed from the shards; bad inputs, the same reasons."""

import json
import shutil
import subprocess
import sys

from tessera.core.storage import Store
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.stage import run_shard_stage
from tessera.workflows.predict import Predictor, predict_inputs
from tests.conftest import DIRTY, MINI, REPO, TESSERA, mini_manifest_lines, reject_rows


def assert_same_probabilities(records, evaluated, tolerance=1e-4):
    """Every task's prediction: class and tag probabilities, and the regression value (in its
    units, so relative to its size)."""
    assert records and all(not r.get("rejected") for r in records)
    for record in records:
        expected = evaluated[record["key"]]
        assert set(record["predictions"]) == set(expected) == {"label", "has_audio", "media", "words"}
        for task, scores in expected.items():
            if task == "words":
                assert abs(record["predictions"][task] - scores[0]) < tolerance * max(1.0, abs(scores[0]))
            else:
                got = record["scores"][task].values()
                assert max(abs(a - b) for a, b in zip(got, scores, strict=True)) < tolerance, task


def test_raw_files_give_the_probabilities_evaluation_gave_from_the_shards(exported_mini, tmp_path):
    model, evaluated = exported_mini
    rows = [json.loads(line) for line in mini_manifest_lines(43)]
    chosen = [r for r in rows if r["key"] in evaluated and {"image", "audio", "video"} <= set(r)][:2]
    chosen += [r for r in rows if r["key"] in evaluated and "audio" not in r][:1]
    assert len(chosen) == 3
    for row in chosen:  # one folder of files named by key: .png/.jpg, .wav, .mp4, .txt
        for field in ("image", "audio", "video"):
            if field in row:
                shutil.copy(row[field], tmp_path / (row["key"] + "." + row[field].rsplit(".", 1)[1]))
        (tmp_path / f"{row['key']}.txt").write_text(row["text"])
    records = list(predict_inputs(Predictor(Store(str(model))), [str(tmp_path)]))
    assert sorted(r["key"] for r in records) == sorted(r["key"] for r in chosen)
    assert_same_probabilities(records, evaluated)


def test_a_manifest_gives_the_probabilities_of_evaluation_for_every_validation_sample(exported_mini, tmp_path):
    model, evaluated = exported_mini
    manifest = tmp_path / "new.jsonl"
    manifest.write_text("\n".join(line for line in mini_manifest_lines(43) if json.loads(line)["key"] in evaluated))
    records = list(predict_inputs(Predictor(Store(str(model)), batch_size=5), [str(manifest)]))
    assert len(records) == len(evaluated) > 10
    assert_same_probabilities(records, evaluated)
    int8 = list(predict_inputs(Predictor(Store(str(model)), variant="int8"), [str(manifest)]))
    assert_same_probabilities(int8, evaluated, tolerance=0.05)  # quantized: close, not equal


def test_bad_inputs_are_rejected_with_the_reasons_of_the_shard_stage(exported_mini, ray_session, tmp_path):
    model, _ = exported_mini
    predictor = Predictor(Store(str(model)))
    records = list(predict_inputs(predictor, [str(DIRTY / "manifest.jsonl")]))
    predicted_rejects = {r["line"]: r["reason"] for r in records if r.get("rejected")}
    shard_cfg = ShardConfig.model_validate({**json.loads((model / "preprocess.json").read_text())["shard"],
                                            "max_reject_fraction": None})  # the dirty corpus: 61 % rejects
    run_shard_stage(str(DIRTY / "manifest.jsonl"), Store(str(tmp_path / "shards")), shard_cfg, progress=False)
    shard_rejects = {r["line"]: r["reason"] for r in reject_rows(tmp_path / "shards")}
    # predict does not dedup: each input gets its own line, duplicate keys and content included
    dedup = {line for line, reason in shard_rejects.items() if reason.startswith("duplicate")}
    assert dedup and predicted_rejects == {line: r for line, r in shard_rejects.items() if line not in dedup}
    assert len(predicted_rejects) >= 10
    assert len(records) == sum(1 for line in (DIRTY / "manifest.jsonl").open() if line.strip())
    assert len(records) - len(predicted_rejects) == 9 + len(dedup)


def test_cli_predict_writes_one_json_line_per_input(exported_mini, tmp_path):
    model, evaluated = exported_mini
    key = next(iter(evaluated))
    row = next(json.loads(line) for line in mini_manifest_lines(43) if json.loads(line)["key"] == key)
    (tmp_path / f"{key}.txt").write_text(row["text"])
    shutil.copy(MINI / "images" / "brick.png", tmp_path / "other.png")
    (tmp_path / "notes.xyz").write_text("?")
    out = tmp_path / "predictions.jsonl"
    done = subprocess.run([*TESSERA, "predict", str(model), str(tmp_path / f"{key}.txt"),
                           str(tmp_path / "other.png"), str(tmp_path / "notes.xyz"), "--out", str(out),
                           "--variant", "int8"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["key"] for r in records} == {key, "other", "notes"}
    notes = next(r for r in records if r["key"] == "notes")
    assert notes["reason"] == "unknown file type .xyz" and notes["file"] == str(tmp_path / "notes.xyz")
    assert "2 predicted, 1 rejected" in done.stderr


def test_the_onnx_bundle_predicts_what_the_torch_encoders_do_without_importing_torch(exported_mini, tmp_path):
    model, evaluated = exported_mini
    manifest = tmp_path / "new.jsonl"
    manifest.write_text("\n".join(line for line in mini_manifest_lines(43) if json.loads(line)["key"] in evaluated))
    blocked = ("import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
               "from tessera.workflows.cli import main\n"
               "code = main(sys.argv[1:])\n"
               "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m])\n"
               "sys.exit(code)\n")
    for variant, tolerance in (("fp32", 1e-3), ("int8", 0.1)):
        out = tmp_path / f"{variant}.jsonl"
        done = subprocess.run([sys.executable, "-c", blocked, "predict", str(model), str(manifest), "--bundle",
                               "--variant", variant, "--out", str(out)], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == len(evaluated)
        assert_same_probabilities(records, evaluated, tolerance)
    bundle = json.loads((model / "export.json").read_text())["bundle"]
    assert bundle["samples"] == len(evaluated)
    assert set(bundle["encoders"]) == {"text", "image", "audio", "video"}
    for modality, encoder in bundle["encoders"].items():
        assert encoder["bytes"]["fp32"] > encoder["bytes"]["int8"] > 0, modality
        assert encoder["max_cosine_diff"]["fp32"] < 1e-4, modality
        assert encoder["max_cosine_diff"]["int8"] < 0.2, modality
    assert all(share >= 0.99 for share in bundle["agreement_with_torch"]["fp32"].values())
    assert set(bundle["agreement_with_torch"]["int8"]) == {"label", "has_audio", "media", "words"}
