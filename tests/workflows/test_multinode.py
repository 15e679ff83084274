"""A real multi-node Ray cluster on loopback whose nodes share no disk: the head (no CPUs: drivers
only, as in cluster.yaml) on this machine's disk, and worker nodes each started by `ray start`
inside its own mount namespace with a private tmpfs over the test's folder, so a node sees
neither the driver's local files nor another node's. The manifest, the inputs, OUT and the
checkpoints are on the moto S3 server, reached through a proxy that fails some of the requests.
Worker nodes are killed in the middle of sharding, of embedding and of training of one
`tessera run`."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tessera.core.storage import Store
from tessera.features.layout import read_sidecar
from tessera.preprocess.layout import MARKER
from tessera.train.config import ExportConfig
from tessera.train.export import export_run
from tessera.workflows.jobs import bundled_manifest
from tessera.workflows.predict import Predictor, predict_inputs
from tests.conftest import LABELS, MINI, REPO, TESSERA, free_port, terminated

pytestmark = pytest.mark.slow  # (see README: the test tiers)

RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a loopback test cluster; no token to hand around
NODE_NAMESPACE = "unshare --mount --propagation private true"


class LoopbackCluster:
    """Ray nodes on this machine; worker nodes in private mount namespaces (see the module doc)."""

    def __init__(self, private: Path):
        self.private = private  # hidden from the worker nodes: each mounts its own tmpfs here
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.before = set(psutil.pids())
        self.nodes: list[int] = []  # worker nodes' raylet ports

    def start(self, workers: int) -> None:
        self._ray_start("--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false")
        for _ in range(workers):
            self.add_node()

    def add_node(self) -> int:
        """A worker node with 1 CPU, a private tmpfs over PRIVATE and its scratch (TMPDIR) in it."""
        port = free_port()
        script = ('mount -t tmpfs tmpfs "$0" && mkdir "$0/scratch" && '
                  'TMPDIR="$0/scratch" exec "$1" start --disable-usage-stats --address="$2" --num-cpus=1 '
                  '--node-manager-port="$3"')
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(self.private),
                        RAY, self.address, str(port)], check=True, env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.nodes.append(port)
        return port

    def holding(self, pattern: str) -> int:
        """The worker node whose private folder holds a file matching PATTERN (relative to it),
        looked up through its raylet's view of the filesystem (/proc/PID/root)."""
        for port in self.nodes:
            root = Path(f"/proc/{self._raylet(port).pid}/root") / self.private.relative_to("/")
            if list(root.glob(pattern)):
                return port
        raise LookupError(f"no node holds {pattern}")

    def _raylet(self, port: int) -> psutil.Process:
        return next(p for p in psutil.process_iter(["name", "cmdline"])
                    if "raylet" in (p.info["name"] or "") and f"--node_manager_port={port}" in " ".join(
                        p.info["cmdline"] or []))

    def kill_node(self, port: int) -> None:
        """SIGKILL the node's raylet and everything it started (its workers die mid-task)."""
        raylet = self._raylet(port)
        for p in [raylet, *raylet.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        self.nodes.remove(port)

    def stop(self) -> None:
        # `ray stop` would also stop the test session's own local Ray: end only what this
        # cluster started (daemons detached from this process, so not among its descendants)
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        for pid in set(psutil.pids()) - self.before - ours - {os.getpid()}:
            with contextlib.suppress(psutil.Error):
                command = " ".join(psutil.Process(pid).cmdline())
                if "ray" in command.lower() and str(self.port) in command:  # this cluster's, not another Ray
                    psutil.Process(pid).kill()
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()

    def _ray_start(self, *args: str) -> None:
        subprocess.run([RAY, "start", "--disable-usage-stats", *args], check=True, env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if subprocess.run(NODE_NAMESPACE.split(), capture_output=True).returncode:
        pytest.fail(f"`{NODE_NAMESPACE}` failed: this test gives each Ray node a private disk with a mount "
                    "namespace and a tmpfs, which needs root (CI runs as root)")
    private = tmp_path_factory.mktemp("private")
    cluster = LoopbackCluster(private)
    try:
        cluster.start(workers=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def s3(s3_options):
    """The S3 server with the mini corpus uploaded (manifest paths are relative: they follow it)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options["s3"], use_listings_cache=False)  # the test polls for new files
    for bucket in ("mn-corpus", "mn-runs"):  # (the S3 server is shared with other test modules)
        fs.mkdir(bucket)
    fs.put(str(MINI) + "/", "mn-corpus/mini/", recursive=True)
    return fs


def tessera(cluster: LoopbackCluster, *args: str) -> subprocess.Popen:
    """A `tessera` driver on the head's machine, its scratch in the folder the nodes cannot see."""
    scratch = cluster.private / "driver"
    scratch.mkdir(exist_ok=True)
    return subprocess.Popen([*TESSERA, *args, "--address", cluster.address,
                             "--no-progress"], cwd=REPO, env={**ENV, "TMPDIR": str(scratch)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, what: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.05)


def test_nodes_cannot_see_each_others_files(cluster):
    (cluster.private / "on-the-driver").write_text("x")
    probe = ("import os, ray, sys\n"
             "ray.init(address=sys.argv[1])\n"
             "@ray.remote(num_cpus=1)\n"
             "def look(path):\n"
             "    import tempfile\n"
             "    open(os.path.join(tempfile.gettempdir(), 'mine'), 'w').close()\n"
             "    return os.path.exists(path), sorted(os.listdir(tempfile.gettempdir()))\n"
             "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On\n"
             "nodes = [n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]\n"
             "print(ray.get([look.options(scheduling_strategy=On(n, soft=False)).remote(sys.argv[2]) "
             "for n in nodes]))\n")
    result = subprocess.run([sys.executable, "-c", probe, cluster.address, str(cluster.private / "on-the-driver")],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = eval(result.stdout.strip().splitlines()[-1])  # a list of (bool, [names]) printed by the probe
    assert len(seen) == 2
    for exists, names in seen:  # neither the driver's file nor the other node's scratch file is visible
        assert not exists and names.count("mine") == 1


def test_serve_deploys_on_the_cluster_with_its_replicas_on_two_nodes(cluster, s3, s3_options, exported_mini, tmp_path):
    """`tessera serve --address`: the export read from S3 by each node, one replica per 1-CPU
    node, the proxy on the head; answered over HTTP; SIGTERM removes the application."""
    import requests

    model, _ = exported_mini
    s3.put(str(model) + "/", "mn-runs/serve-model/", recursive=True)
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"runtime": {"storage_options": s3_options},
                                  "serve": {"replicas": 2, "proxy_location": "HeadOnly"}}))
    port = free_port()
    proc = tessera(cluster, "serve", "s3://mn-runs/serve-model", "--config", str(config), "--port", str(port))
    try:
        wait_for(lambda: _ready(f"http://127.0.0.1:{port}/readyz"), "the service ready", proc)
        sample = {"key": "cluster", "text": "A horse standing in a green field."}
        answer = requests.post(f"http://127.0.0.1:{port}/predict", json={"samples": [sample]}, timeout=60)
        assert answer.status_code == 200, answer.text
        [result] = answer.json()["results"]
        assert result["key"] == "cluster" and set(result["predictions"]) == {"label", "has_audio", "media", "words"}
        replicas = [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:tessera" in " ".join(
            p.info["cmdline"] or [])]
        nodes = {next(arg for arg in r.parent().cmdline() if arg.startswith("--node_manager_port=")) for r in replicas}
        assert len(replicas) == 2 and nodes == {f"--node_manager_port={n}" for n in cluster.nodes}
    finally:
        terminated(proc)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
    wait_for_gone = time.monotonic() + 60  # the replicas' CPUs are free again for the next job
    while [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:tessera" in " ".join(p.info["cmdline"] or [])]:
        assert time.monotonic() < wait_for_gone, "the replicas outlived the service"
        time.sleep(1)


def _ready(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


SHARD = {"samples_per_shard": 4, "labels": list(LABELS)}
EMBED = {"actors": 2, "cpus_per_actor": 1, "audio": None, "video": None}


@pytest.fixture(scope="module")
def calm_run(ray_session, tmp_path_factory) -> tuple[dict, dict]:
    """The run's shards and sidecars made on this machine's disk, with no fault of any kind."""
    from tessera.features.config import EmbedConfig
    from tessera.features.stage import run_embed_stage
    from tessera.preprocess.config import ShardConfig
    from tessera.preprocess.stage import run_shard_stage

    out = Store(str(tmp_path_factory.mktemp("calm")))
    run_shard_stage(str(MINI / "manifest.jsonl"), out, ShardConfig(**SHARD), progress=False)
    run_embed_stage(out, EmbedConfig(**EMBED), progress=False)
    return committed(out)


def committed(folder: Store) -> tuple[dict[str, bytes | dict], dict[str, dict]]:
    """A shard folder's tars, index and rejects parts and markers (their plan digests aside: they
    hold the manifest file's tag, an ETag on S3, an mtime on disk), and its sidecars' columns."""
    found, sidecars = {}, {}
    for name in folder.names("*") + folder.names("*/*"):
        if name.endswith(".tar") or name.startswith(("index/", "rejects/")):
            found[name] = folder.read_bytes(name)
        elif MARKER.fullmatch(name):
            found[name] = {k: v for k, v in folder.read_json(name).items() if k != "plan_digest"}
        elif name.endswith(".emb.parquet"):
            sidecars[name] = read_sidecar(folder, name.removesuffix(".emb.parquet")).to_pydict()
    return found, sidecars


def differences(got: dict[str, bytes | dict], want: dict[str, bytes | dict]) -> list[str]:
    """What differs between two `committed` folders: names only one has, and per file that
    differs its sizes and, for a tar, the members that differ (a failure says where to look)."""
    found = [f"only in the run: {n}" for n in got.keys() - want.keys()]
    found += [f"only in the calm run: {n}" for n in want.keys() - got.keys()]
    for name in sorted(got.keys() & want.keys()):
        if got[name] == want[name]:
            continue
        if not name.endswith(".tar"):
            found.append(f"{name}: {len(got[name])} vs {len(want[name])} bytes")
            continue
        mine, calm = tar_members(got[name]), tar_members(want[name])
        found += [f"{name}:{m}: {len(mine.get(m, b''))} vs {len(calm.get(m, b''))} bytes"
                  for m in sorted(mine.keys() | calm.keys()) if mine.get(m) != calm.get(m)]
    return found


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def same_vectors(got: dict[str, dict], want: dict[str, dict]) -> bool:
    """The same sidecars: keys, which vectors are there, and their values (to float32 round-off:
    a vector recomputed by a later round may have shared its batch with others)."""
    if got.keys() != want.keys():
        return False
    for name, columns in want.items():
        if got[name].keys() != columns.keys() or got[name]["key"] != columns["key"]:
            return False
        for column, values in columns.items():
            mine = got[name][column]
            if column == "key":
                continue
            if [v is None for v in mine] != [v is None for v in values]:
                return False
            pairs = [(a, b) for a, b in zip(mine, values, strict=True) if b is not None]
            if pairs and not np.allclose(np.array([a for a, _ in pairs], np.float32),
                                         np.array([b for _, b in pairs], np.float32), atol=1e-5):
                return False
    return True


def test_run_through_a_flaky_store_survives_losing_nodes_while_sharding_embedding_and_training(
        cluster, s3, s3_options, flaky_s3, calm_run, tmp_path):
    """One `tessera run` through an S3 proxy that fails 5 % of the requests (503 SlowDown, or
    the connection dropped), losing a node while sharding, another while embedding and another
    while training: it completes, its shards and sidecars equal a calm run's, the cache lost
    nothing and took nothing for corrupt."""
    started = time.monotonic()
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({
        "job": {"manifest": "s3://mn-corpus/mini/manifest.jsonl", "out": "s3://mn-runs/mini"},
        "runtime": {"storage_options": flaky_s3.options},
        "shard": SHARD, "embed": EMBED,
        "train": {"workers": 2, "max_steps": 40, "epochs": 20, "checkpoint_every": 4, "micro_batch_size": 4,
                  "loader_workers": 2, "model": {"modalities": ["text", "image"]}},
    }))
    flaky_s3.rate, flaky_s3.faults, flaky_s3.requests = 0.05, 0, 0
    proc = tessera(cluster, "run", str(config))
    wait_for(lambda: s3.glob("mn-runs/mini/shards/shard-0*.json"), "a committed shard", proc)
    cluster.kill_node(cluster.nodes[-1])  # it dies with whatever shard task it was running
    assert not s3.exists("mn-runs/mini/shards/summary.json")
    cluster.add_node()
    wait_for(lambda: s3.glob("mn-runs/mini/shards/shard-0*.emb.parquet"), "a sidecar", proc)
    cluster.kill_node(cluster.nodes[0])  # with its encoder actor, mid-shard: restarted on the node that joins
    assert not s3.exists("mn-runs/mini/shards/embed-summary.json")
    cluster.add_node()
    wait_for(lambda: s3.glob("mn-runs/mini/train/*/checkpoints/latest"), "a training checkpoint", proc)
    time.sleep(1.0)  # some steps past the checkpoint
    # the node of rank 1 (rank 0 keeps metrics.jsonl in its scratch): rank 0 survives to record
    # exactly how far training got, so the steps lost are measured, not estimated
    rank0 = cluster.holding("scratch/tessera-train/*/metrics.jsonl")
    cluster.kill_node(next(port for port in cluster.nodes if port != rank0))
    cluster.add_node()  # the restarted worker group lands partly on a node that has never seen this run
    log, _ = proc.communicate(timeout=600)
    flaky_s3.rate = 0.0
    assert proc.returncode == 0, log[-4000:]

    report = json.loads(s3.cat_file("mn-runs/mini/run-summary.json"))
    shard, embed, train = (report["stages"][s] for s in ("shard", "embed", "train"))
    assert shard["inputs"] == shard["accepted"] == 43 and shard["shards"] == 11
    # every shard and sidecar whole, as a calm run makes them
    (files, sidecars), (calm_files, calm_sidecars) = committed(Store("s3://mn-runs/mini/shards", s3_options)), calm_run
    assert files == calm_files, differences(files, calm_files)
    assert same_vectors(sidecars, calm_sidecars)
    assert embed["cache_corrupt"] == [] and embed["errors"] == 0
    assert all(m["missing_in_sidecars"] == 0 and embed["cache_rows"][name] <= m["unique"]
               for name, m in embed["modalities"].items())
    # (which nodes committed them depends on when the kill lands: only the total is fixed)
    assert sum(shard["shards_by_node"].values()) == 11, shard["shards_by_node"]
    for marker in s3.glob("mn-runs/mini/shards/shard-0*.json"):  # every committed shard is whole
        with s3.open(marker.replace(".json", ".tar"), "rb") as f, tarfile.open(fileobj=f) as tar:
            keys = {name.split(".", 1)[0] for name in tar.getnames()}
        assert len(keys) == json.loads(s3.cat_file(marker))["written"]
    assert embed["samples"] == 43 and train["steps"] == 40
    run = train["model"].removeprefix("s3://").rsplit("/", 1)[0]
    metrics = [json.loads(line) for line in s3.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    resumes = [r for r in metrics if "resumed_at" in r]
    # at most a checkpoint interval is trained again (a kill during a save loses the step saved)
    assert len(resumes) == 1 and resumes[0]["resumed_at"] % 4 == 0 and resumes[0]["steps_redone"] <= 4, resumes
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 41))  # each step once, in order
    assert json.loads(s3.cat_file(f"{run}/eval.json"))["sets"]["val"]["samples"] > 0
    assert s3.exists("mn-runs/mini/report.html")
    seconds = time.monotonic() - started

    again = tessera(cluster, "run", str(config))  # every stage up to date, read from the store
    log, _ = again.communicate(timeout=300)
    assert again.returncode == 0, log[-3000:]
    assert all(stage["up_to_date"] for stage in json.loads(s3.cat_file("mn-runs/mini/run-summary.json"))["stages"]
               .values())
    # export and predict straight from the store
    model = Store("s3://mn-runs/mini/model", s3_options)
    export_run(model.at(f"s3://{run}"), model, ExportConfig())
    assert json.loads(s3.cat_file("mn-runs/mini/model/export.json"))["variants"]["int8"]["bytes"] > 0
    records = list(predict_inputs(Predictor(model), [bundled_manifest()]))
    assert len(records) == 17 and all(r["predictions"]["label"] in LABELS for r in records)
    print(f"\nprivate-disk cluster run through a flaky store: {seconds:.0f} s; {flaky_s3.faults} of "
          f"{flaky_s3.requests} requests failed; store calls retried: shard {shard['store_retries']}, embed "
          f"{embed['store_retries']}, train {train['store_retries']}; embedding rounds {embed['rounds']}, "
          f"{embed['computed']} vectors computed for {sum(m['unique'] for m in embed['modalities'].values())} "
          f"distinct payloads; training resumed at step {resumes[0]['resumed_at']} after a node was lost, "
          f"{resumes[0]['steps_redone']} steps trained again (checkpoints every 4)")
