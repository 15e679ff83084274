"""One writer per output folder: two `tessera shard`, then two `tessera embed`, started
together on one OUT (on disk and on S3): one proceeds, the other exits 75 at once (before it
starts Ray) saying who holds the folder; the output equals a single run's."""

import json
import os
import subprocess

import pytest

from tessera.core.runtime import LOGS
from tessera.core.storage import Store
from tessera.features.config import EmbedConfig
from tessera.features.layout import CACHE
from tessera.features.stage import run_embed_stage
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.layout import MANIFEST_SOURCE, MARKER
from tessera.preprocess.stage import run_shard_stage
from tests.conftest import LABELS, REPO, TESSERA

pytestmark = pytest.mark.slow  # (see README: the test tiers)

SAMPLE = REPO / "workflows" / "sample_corpus"
SETTINGS = {"runtime": {"workers": 1}, "shard": {"samples_per_shard": 6, "labels": list(LABELS)},
            "embed": {"image": None, "audio": None, "video": None, "cpus_per_actor": 1}}


def together(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "RAY_ADDRESS": ""}  # each its own local Ray, if it gets that far
    procs = [subprocess.Popen([*TESSERA, *c, "--no-progress"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def outputs(folder: Store) -> dict[str, bytes | dict]:
    """What the stages committed, but their summaries (timings), the lease (its holder), the
    cache, the commands' logs, and what depends on where the manifest is (its files' tags: ETags on S3, mtimes on
    disk, in manifest-source.json and the markers' plan digests)."""
    found = {}
    for name in folder.infos():
        if name.endswith(("summary.json", "lease.json", ".lock", MANIFEST_SOURCE)) or name.startswith((CACHE, LOGS)):
            continue
        found[name] = folder.read_bytes(name)
        if MARKER.fullmatch(name):
            found[name] = {k: v for k, v in json.loads(found[name]).items() if k != "plan_digest"}
    return found


@pytest.fixture(scope="module")
def single_run(ray_session, tmp_path_factory) -> dict[str, bytes]:
    out = Store(str(tmp_path_factory.mktemp("single")))
    run_shard_stage(str(SAMPLE / "manifest.jsonl"), out, ShardConfig(**SETTINGS["shard"]), progress=False)
    run_embed_stage(out, EmbedConfig(**SETTINGS["embed"]), progress=False)
    return outputs(out)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_shard_then_two_embed_runs_started_together(single_run, tmp_path, where, request):
    settings = dict(SETTINGS)
    if where == "s3":
        import s3fs

        options = request.getfixturevalue("s3_options")
        fs = s3fs.S3FileSystem(**options["s3"])
        fs.mkdir("writers")
        fs.put(str(SAMPLE) + "/", "writers/sample/", recursive=True)
        manifest, url = "s3://writers/sample/manifest.jsonl", "s3://writers/out"
        settings["runtime"] = {**settings["runtime"], "storage_options": options}
    else:
        # (a quote in the folder's name: the stages' DuckDB queries take store URLs quoted)
        manifest, url = str(SAMPLE / "manifest.jsonl"), str(tmp_path / "it's out")
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(settings))
    for command in (["shard", manifest, url], ["embed", url]):
        runs = together(*[[*command, "--config", str(config)]] * 2)
        assert sorted(r.returncode for r in runs) == [0, 75], [r.stderr[-2000:] for r in runs]
        refused = next(r for r in runs if r.returncode == 75)
        assert f"is held by tessera {command[0]} (pid" in refused.stderr
        assert "Started a local Ray" not in refused.stderr and "started a local Ray" not in refused.stderr
    out = Store(url, settings["runtime"].get("storage_options"))
    assert outputs(out) == single_run and out.read_json("lease.json")["released"]
