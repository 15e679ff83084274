"""What a person sees: `tessera run --dry-run` in a terminal shows tessera's few lines, its
progress bars and the summary table, not Ray's, DeepSpeed's or transformers' chatter (that is in
OUT/logs/); --json prints the machine-readable record; -v shows worker output live."""

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MINI, TESSERA

LINE_BUDGET = 40
NOT_OURS = ("pid=", "PlacementGroupCleaner", "core_worker", "DeepSpeed", "deepspeed", "Loading weights",
            "Reconstructed", "FutureWarning", "UserWarning", "DeprecationWarning", "Token authentication",
            "Quantization parameters")


def tessera(*args: str, cwd, terminal: bool = False) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m tessera.workflows ARGS`; with TERMINAL both streams are
    one pseudo-terminal and stdout holds what it showed."""
    command = [*TESSERA, *args]
    env = {**os.environ, "RAY_ADDRESS": ""}
    if not terminal:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        return done.returncode, done.stdout, done.stderr
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
    os.close(secondary)
    shown = []
    while True:
        try:
            data = os.read(primary, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown.append(data)
    os.close(primary)
    return proc.wait(timeout=900), b"".join(shown).decode(errors="replace"), ""


# a user's own modules named like tessera's folders, on the path of every process started there
# (the driver run from that folder, and the Ray workers that take its working directory)
USERS_OWN = ("train", "features", "preprocess", "workflows", "core")


@pytest.mark.slow
def test_a_dry_run_shows_its_own_lines_and_the_summary_table(tmp_path):
    """`tessera run --dry-run` from a folder where a user keeps train.py, features.py, ... that
    fail on import: tessera imports only its own namespace (tessera.*)."""
    for name in USERS_OWN:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\'s own {name}.py was imported')\n")
    code, shown, _ = tessera("run", "--dry-run", cwd=tmp_path, terminal=True)
    lines = [line for line in shown.replace("\r\n", "\n").split("\n") if line.strip()]
    assert code == 0, shown[-3000:]
    assert not [line for line in lines if any(mark in line for mark in NOT_OURS)], shown
    assert len(lines) <= LINE_BUDGET, shown
    report = tmp_path / "out" / "dry-run" / "report.html"
    assert report.exists()
    tail = "\n".join(lines[-12:])
    unfolded = re.sub(r"\x1b\[[0-9;]*m|[\s│]", "", tail)  # (a long path is folded over the table's lines)
    assert "report" in tail and "report.html" in unfolded and "accepted" in tail, shown
    logs = list((tmp_path / "out" / "dry-run" / "logs").glob("*-run/*"))
    assert any(p.name == "driver.log" for p in logs) and any(p.name.startswith("worker-") for p in logs)

    # tessera status of that run output: its stages, the run, where the report and the model are
    code, out, err = tessera("status", "out/dry-run", "--json", cwd=tmp_path)
    assert code == 0, err
    status = json.loads(out)
    assert status["kind"] == "job output (tessera run)" and status["lease"] is None
    assert [name for name in status["stages"] if not name.startswith("train ")] == ["shard", "embed"]
    assert all(stage["complete"] for stage in status["stages"].values()) and len(status["stages"]) == 3
    assert status["report"] == str(report) and status["model"].endswith("model.safetensors")
    assert status["last_run"]["seconds"] > 0

    # --json: the record scripts read, as the last line (an up-to-date run)
    code, out, err = tessera("run", "--dry-run", "--json", cwd=tmp_path)
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert set(record) == {"shard", "embed", "train", "seconds"}
    assert all(record[stage]["up_to_date"] for stage in ("shard", "embed", "train"))


@pytest.mark.slow
def test_verbose_shows_worker_lines_and_quiet_does_not(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(line for line in (MINI / "manifest.jsonl").open()
                                if '"image"' not in line and '"audio"' not in line and '"video"' not in line))
    code, out, err = tessera("shard", str(manifest), str(tmp_path / "quiet"), "--no-progress", cwd=tmp_path)
    assert code == 0, err
    assert "pid=" not in out + err
    assert "committed" not in out + err  # the worker's own INFO line stays in the logs ...
    assert any("committed" in p.read_text() for p in (tmp_path / "quiet" / "logs").glob("*/worker-*"))
    code, out, err = tessera("shard", str(manifest), str(tmp_path / "loud"), "--no-progress", "-v", cwd=tmp_path)
    assert code == 0, err
    assert [line for line in (out + err).splitlines() if "pid=" in line and "committed" in line]  # ... or shows live


OTHER_SESSION = """
import ray, sys, time
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
@ray.remote
def other_job():
    print("OTHER-JOB-OUTPUT", flush=True)
ray.get(other_job.remote())
print("ready", flush=True)
time.sleep(120)
"""


def test_only_this_sessions_own_worker_output_is_kept_and_bounded(ray_session, tmp_path):
    """Another Ray session started on the host after this one (so it is the newest,
    /tmp/ray/session_latest): none of its files reach OUT/logs; this session's workers' output
    does, each file cut to its last LOG_FILE_BYTES."""
    from tessera.core.runtime import LOG_FILE_BYTES, RuntimeConfig, save_logs
    from tessera.core.storage import Store

    @ray_session.remote
    def ours() -> None:
        print("OUR-OWN-OUTPUT " + "x" * (2 * LOG_FILE_BYTES), flush=True)

    ray_session.get(ours.remote())
    other = subprocess.Popen([sys.executable, "-c", OTHER_SESSION], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        assert other.stdout.readline().strip() == "ready"
        kept = save_logs(Store(str(tmp_path)), "tessera shard", RuntimeConfig())
    finally:
        other.kill()
        other.wait()
    files = [p for p in Path(kept).iterdir() if p.name.startswith("worker-")]
    texts = [p.read_bytes() for p in files]
    assert files and not [t for t in texts if b"OTHER-JOB-OUTPUT" in t]
    assert [t for t in texts if b"OUR-OWN-OUTPUT" in t or b"of this file are left out" in t]
    assert max(len(t) for t in texts) <= LOG_FILE_BYTES + 100


def test_a_validation_figure_says_its_chance_level_and_when_it_rests_on_few_samples():
    from tessera.train.tasks import Task, validation_record
    from tessera.workflows.screen import train_text

    tasks = (Task("label", "label", "classification", tuple("abcdefg")),)
    record = validation_record(tasks, [6.0, 6.0, 1.0, 0.0, 0.0], 6)
    text = train_text({"steps": 10, "train_samples": 37, "first_loss": 2.0, "final_loss": 1.5,
                       "val_samples": 6, "val_tasks": record["val_tasks"]})
    assert text.endswith("validation (6 samples, too few to judge a model by): label accuracy 0.167 (chance 0.143)")
    many = train_text({"steps": 10, "train_samples": 900, "val_samples": 300, "val_tasks": record["val_tasks"]})
    assert "too few" not in many and "(chance 0.143)" in many


def test_a_pipeline_run_says_what_each_stage_held():
    from tessera.workflows.screen import train_text

    text = train_text({"steps": 4, "train_samples": 11, "val_samples": 0, "val_tasks": None,
                       "pipeline_stages": ["text tower (22.6M trainable)", "fusion, 2 blocks, heads (0.3M trainable)"]})
    assert text == ("4 steps on 11 samples; pipeline text tower (22.6M trainable) | "
                    "fusion, 2 blocks, heads (0.3M trainable)")
