"""Inputs a manifest may name: under the manifest's folder or bucket prefix, or a root listed in
shard.inputs.allow; anything else is a reject line and is never read."""

import http.server
import json
import os
import shutil
import tarfile
import threading

import pytest
from pydantic import ValidationError

from tessera.core.storage import Store
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.inputs import AllowedInputs
from tessera.preprocess.manifest import LineReject, fetch_batch, iter_manifest
from tessera.preprocess.stage import run_shard_stage
from tests.conftest import MINI, reject_rows


class CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        CountingHandler.requests.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"secret from another host")

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server():
    """A loopback HTTP server that records every request it gets (the test checks it gets none)."""
    CountingHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def corpus(tmp_path, rows: list[dict]):
    """A manifest folder tmp/corpus with one image of its own, a secret file beside (outside) it."""
    folder = tmp_path / "corpus"
    (folder / "images").mkdir(parents=True)
    shutil.copy(MINI / "images" / "horse.png", folder / "images" / "horse.png")
    (tmp_path / "secret.txt").write_text("the operator's secret")
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "manifest.jsonl"


def rejects_of(manifest, cfg: ShardConfig, store: Store | None = None) -> dict[str, str]:
    return {item.key: item.reason for item in iter_manifest(str(manifest), cfg, store or Store(str(manifest)))
            if isinstance(item, LineReject)}


def test_paths_outside_the_manifest_folder_are_rejected_without_a_read(ray_session, tmp_path, http_server):
    (tmp_path / "corpus").mkdir()
    os.symlink(tmp_path / "secret.txt", tmp_path / "corpus" / "link.txt")
    manifest = corpus(tmp_path, [
        {"key": "inside", "image": "images/horse.png", "text": "a horse"},
        {"key": "absolute", "text_file": str(tmp_path / "secret.txt")},
        {"key": "escape", "text_file": "../secret.txt"},
        {"key": "dotted", "text_file": "images/../../secret.txt"},
        {"key": "symlink", "text_file": "link.txt"},
        {"key": "http", "image": f"{http_server}/latest/meta-data/iam.png", "text": "metadata endpoint"},
    ])
    out = tmp_path / "out"
    summary = run_shard_stage(str(manifest), Store(str(out)), ShardConfig(max_reject_fraction=None), progress=False)
    assert summary.accepted == 1
    reasons = {r["key"]: r["reason"] for r in reject_rows(out)}
    assert sorted(reasons) == ["absolute", "dotted", "escape", "http", "symlink"]
    assert all("outside the allowed inputs" in reason for reason in reasons.values()), reasons
    assert reasons["http"].startswith("image: ") and reasons["escape"].startswith("text_file: ")
    assert CountingHandler.requests == []  # the other host was never contacted
    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            assert all(b"secret" not in tar.extractfile(m).read() for m in tar.getmembers())


def test_listed_roots_are_read(tmp_path, http_server):
    manifest = corpus(tmp_path, [{"key": "beside", "text_file": str(tmp_path / "secret.txt")},
                                 {"key": "web", "text_file": f"{http_server}/captions/a.txt"}])
    assert set(rejects_of(manifest, ShardConfig())) == {"beside", "web"}
    allowed = ShardConfig(inputs={"allow": [str(tmp_path / "secret.txt"), f"{http_server}/captions/"]})
    assert rejects_of(manifest, allowed) == {}
    assert CountingHandler.requests == []  # checking the manifest reads no input either


def test_another_bucket_is_refused_unless_listed(s3_options):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options["s3"])
    for bucket in ("data", "data-private"):
        fs.mkdir(bucket)
    fs.pipe_file("data-private/secret.txt", b"secret")
    fs.pipe_file("data/corpus/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"key": "other", "text_file": "s3://data-private/secret.txt"},
        {"key": "climb", "text_file": "../../data-private/secret.txt"},
        {"key": "prefix-lookalike", "text_file": "s3://data/corpus-evil/x.txt"},
        {"key": "own", "text_file": "s3://data/corpus/sub/x.txt"},
    ]).encode())
    bucket = Store("s3://data", s3_options)
    reasons = rejects_of("s3://data/corpus/manifest.jsonl", ShardConfig(), bucket)
    assert set(reasons) == {"other", "climb", "prefix-lookalike"}
    allowed = ShardConfig(inputs={"allow": ["s3://data-private/"]})
    assert set(rejects_of("s3://data/corpus/manifest.jsonl", allowed, bucket)) == {"prefix-lookalike"}


def test_prefixes_match_whole_path_segments():
    allowed = AllowedInputs.of("s3://bucket/corpus", ("https://cdn.example.com/img/", "/data/shared"))
    assert allowed.refusal("s3://bucket/corpus/a/b.png") is None
    assert allowed.refusal("s3://bucket/corpus/../corpus/b.png") is None
    assert allowed.refusal("s3://bucket/corpus2/b.png") and allowed.refusal("s3://bucket/b.png")
    assert allowed.refusal("HTTPS://CDN.example.com/img/x.png") is None
    assert allowed.refusal("https://cdn.example.com/img/../admin") and allowed.refusal("http://cdn.example.com/img/x")
    assert allowed.refusal("/data/shared/x.wav") is None and allowed.refusal("/data/shared-other/x.wav")
    assert AllowedInputs.of("/m", ("https://",)).refusal("https://any.host/x.png") is None


def test_allow_entries_must_be_absolute():
    with pytest.raises(ValidationError, match="absolute paths or URLs"):
        ShardConfig(inputs={"allow": ["images/"]})


def test_an_input_over_the_size_limit_is_a_reject_read_no_further(tmp_path):
    (tmp_path / "big.txt").write_bytes(b"x" * 100_000)
    (tmp_path / "small.txt").write_bytes(b"a caption")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"key": "big", "text_file": "big.txt"}) + "\n"
                        + json.dumps({"key": "small", "text_file": "small.txt"}) + "\n")
    store = Store(str(tmp_path))
    rows = [r for r in iter_manifest(str(manifest), ShardConfig(), store) if not isinstance(r, LineReject)]
    got = store.read_many([row.files["text"] for row in rows], limit=1000)
    assert [len(data) for data in got.values()] == [1001, 9]  # a ranged read: the limit and a byte
    big, small = fetch_batch(rows, store, 1000)
    assert big[1].reason == f"file too large: {tmp_path / 'big.txt'} is 100000 bytes, over shard.max_input_bytes (1000)"
    assert small[1] == {"text": b"a caption"}
