import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tessera.workflows.cli import EXIT_CONFIG, EXIT_CONFLICT, EXIT_NO_INPUT, EXIT_NO_SPACE, main
from tessera.workflows.jobs import bundled_corpus
from tests.conftest import REPO, TESSERA

SAMPLE = str(REPO / "workflows" / "sample_corpus" / "manifest.jsonl")


def test_shard_command_prints_counts(ray_session, tmp_path, capsys):
    """The dry run's input: the bundled corpus's two manifests (a glob), the CT and MR among them."""
    code = main(["shard", bundled_corpus(), str(tmp_path), "--config", str(REPO / "configs" / "demo.yaml"),
                 "--no-progress"])
    assert code == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["inputs"] == 19 and counts["accepted"] == 18 and counts["shards"] == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the demo config drops near copies: moon-silent shows moon's picture again
    assert summary["rejected_by_code"] == {"dedup.near_duplicate": 1}
    assert summary["statistics"]["medical"] == {"CT": 1, "MR": 1}
    code = main(["shard", SAMPLE, str(tmp_path), "--config", str(REPO / "configs" / "demo.yaml"),
                 "--seed", "5", "--no-progress"])
    assert code == EXIT_CONFLICT and "fields changed: seed" in capsys.readouterr().err
    # ... found before any Ray: a driver pointed at no cluster at all still says so
    done = subprocess.run([*TESSERA, "shard", SAMPLE, str(tmp_path), "--config",
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
        "import sys, time\nfrom tessera.core.lease import Lease, LeaseConfig\nfrom tessera.core.storage import Store\n"
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


@pytest.mark.slow
def test_export_says_what_it_wrote_without_onnxruntime_chatter(trained_mini, tmp_path):
    done = subprocess.run([*TESSERA, "export", str(trained_mini), str(tmp_path / "model"),
                           "--set", "export.prune_sparsity=0.5"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    assert "Quantization parameters" not in shown and "pre-processing before quantization" not in shown
    table = done.stderr  # stdout is not a terminal: the table on stderr, the records on stdout
    assert "x1.00 smaller" not in table and "gzipped" in table and "smaller)" in table
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["variant"] for r in records] == ["fp32", "int8", "pruned"]


@pytest.mark.slow
def test_a_full_disk_is_one_line_no_retries_lease_released_nothing_half_written(tmp_path):
    """OUT on a 2 MB tmpfs (a mount namespace of its own) with 1.4 MB taken: `tessera shard` of the sample corpus
    stops at the first shard that does not fit with one line naming OUT and "no space left" (exit
    74, no task retried), its lease released, no temporary left; a re-run on the still-full disk
    says the same; once space is freed the re-run resumes to the bytes of a run on a roomy disk."""
    out, kept = tmp_path / "out", tmp_path / "kept"
    out.mkdir()
    tessera = f"{' '.join(TESSERA)} shard {SAMPLE} {out} --samples-per-shard 4 --workers 1 --no-progress"
    script = f"""
        mount -t tmpfs -o size=2m tessera-full {out} || exit 99
        head -c 1400000 /dev/zero >{out}/filler
        {tessera} >{tmp_path}/1.out 2>{tmp_path}/1.err; echo $? >{tmp_path}/1.rc
        cp {out}/lease.json {tmp_path}/1.lease 2>/dev/null
        find {out} -name '*.tmp-*' >{tmp_path}/1.tmp
        {tessera} >{tmp_path}/2.out 2>{tmp_path}/2.err; echo $? >{tmp_path}/2.rc
        find {out} -name '*.tmp-*' >{tmp_path}/2.tmp
        rm {out}/filler
        {tessera} >{tmp_path}/3.out 2>{tmp_path}/3.err; echo $? >{tmp_path}/3.rc
        cp -r {out} {kept}"""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                          env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    def said(n: int) -> tuple[int, str]:
        return int((tmp_path / f"{n}.rc").read_text()), (tmp_path / f"{n}.err").read_text()

    for n in (1, 2):
        code, err = said(n)
        lines = [line for line in err.splitlines() if line.startswith("tessera:")]
        assert code == EXIT_NO_SPACE and "Traceback" not in err, err[-3000:]
        assert lines and "no space left on the device" in lines[0] and f"writing into {out}" in lines[0], err
        assert "retrying" not in err.lower() and (tmp_path / f"{n}.tmp").read_text() == ""
    lease = (tmp_path / "1.lease")
    assert not lease.exists() or json.loads(lease.read_text())["released"]
    code, err = said(3)
    assert code == 0, err
    first = json.loads((tmp_path / "3.out").read_text().splitlines()[-1])
    assert first["accepted"] == 17 and not first["up_to_date"]
    roomy = tmp_path / "roomy"
    assert main(["shard", SAMPLE, str(roomy), "--samples-per-shard", "4", "--workers", "1", "--no-progress"]) == 0
    assert sorted(p.name for p in kept.glob("shard-*.tar")) == sorted(p.name for p in roomy.glob("shard-*.tar"))
    for tar in roomy.glob("shard-*.tar"):
        assert (kept / tar.name).read_bytes() == tar.read_bytes(), tar.name


@pytest.mark.slow
def test_sigterm_and_ctrl_c_stop_cleanly_and_a_rerun_resumes(tmp_path):
    """SIGTERM (a scheduler stopping the job) and SIGINT (Ctrl-C) once the first shards are
    committed: exit 143 / 130 with one line and no traceback or native stack, the lease released,
    the logs in OUT/logs; the same command then resumes from the committed shards."""
    from tests.conftest import MINI, mini_manifest_lines

    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    rows = [json.loads(line) for line in mini_manifest_lines(None)]
    copies = [{**row, "key": f"{row['key']}-{i}"} for i in range(3) for row in rows]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in copies))
    command = [*TESSERA, "shard", str(manifest), str(out), "--samples-per-shard", "4",
               "--workers", "1", "--no-progress", "--set", f"shard.inputs.allow={json.dumps([str(MINI)])}"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        markers = len(list(out.glob("shard-*.json")))
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600  # (a bound, not a timing)
        while len(list(out.glob("shard-*.json"))) <= markers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-3000:]
        assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
        assert "what was committed is kept" in err and f"logs: {out}/logs/" in err
        assert json.loads((out / "lease.json").read_text())["released"]
    assert len(list((out / "logs").glob("*-shard/driver.log"))) == 2
    done = subprocess.run(command + ["--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_shards"] >= 2 and summary["inputs"] == 3 * len(rows)


def test_only_the_tessera_namespace_is_installed(tmp_path):
    """The folders install as tessera.*: outside the repository no top-level `train`,
    `features`, `preprocess`, `workflows` or `core` can be imported (a user's own would be)."""
    for name in ("train", "features", "preprocess", "workflows", "core"):
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode != 0 and f"No module named '{name}'" in done.stderr, name
    done = subprocess.run([sys.executable, "-c", "import tessera.train, tessera.core.engine; print('ok')"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
