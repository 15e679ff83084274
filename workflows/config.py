"""The one config tree of a tessera job, loaded from YAML and validated up front."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from features.config import CurateConfig, EmbedConfig
from preprocess.config import ShardConfig, Strict
from preprocess.lease import LeaseConfig
from preprocess.storage import Store
from train.config import ExportConfig, TrainConfig


class RuntimeConfig(Strict):
    """Where and how wide a job runs; none of it changes the outputs."""

    address: str | None = Field(None, description="Ray address; null starts a local Ray")
    workers: int = Field(2, gt=0, description="CPUs of the local Ray, and parallel shard tasks")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. S3")
    progress: bool = True
    verbose: bool = Field(False, description="worker and library output on the terminal, not only in OUT/logs")
    lease: LeaseConfig = LeaseConfig()

    def store(self, url: str) -> Store:
        """The store of URL with these storage options: built once per location a job names,
        then handed down (every other location is reached through it)."""
        return Store(url, self.storage_options)


class JobConfig(Strict):
    """Inputs and outputs of `tessera run`."""

    manifest: str | None = Field(None, description="JSONL or Parquet manifest, any fsspec URL")
    out: str | None = Field(None, description="output root: OUT/shards (+ sidecars, cache), OUT/train/...")
    # what `tessera refresh` trains after adding a version, starting from the newest earlier
    # version's model: none; the new version's samples only; or every version so far
    refresh_train: Literal["none", "new", "all"] = "none"
    # what a row's identity holds of each file it names: its metadata (size + ETag / version /
    # mtime; no input is read to find what changed) or its content (sha256; every file is read)
    refresh_identity: Literal["metadata", "content"] = "metadata"


class ServeConfig(Strict):
    """`tessera serve`: replicas and how each batches requests and bounds them."""

    replicas: int = Field(1, gt=0)
    cpus_per_replica: float = Field(1, gt=0, description="what Ray reserves per replica; also its "
                              "torch threads (Ray sets OMP_NUM_THREADS from it)")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="where Ray Serve runs its HTTP proxies: on every node (put a load balancer "
        "in front) or on the head only")
    max_batch_size: int = Field(32, gt=0, description="samples per model call")
    batch_wait_ms: float = Field(10.0, ge=0, description="how long a batch waits to fill")
    max_request_bytes: int = Field(64 << 20, gt=0, description="larger bodies: 413, before they are read whole")
    max_samples_per_request: int = Field(256, gt=0)
    request_timeout_s: float = Field(30.0, gt=0, description="a request not answered by then: 504")


class TesseraConfig(Strict):
    job: JobConfig = JobConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    shard: ShardConfig = ShardConfig()
    embed: EmbedConfig = EmbedConfig()
    curate: CurateConfig = CurateConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()


class ConfigError(ValueError):
    """A config that cannot be used; the message names each bad field."""


def _format(err: ValidationError, source: str, overridden: dict[str, str]) -> str:
    """Each bad field with what is wrong, and where its value came from: an --set, or SOURCE."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        given = next((f" [from --set {item}]" for dotted, item in overridden.items()
                      if field == dotted or field.startswith(dotted + ".")), "")
        lines.append(f"  {field}: {e['msg']}{got}{given}")
    origin = "given with --set" if all("[from --set" in line for line in lines) else source
    return "\n".join([f"invalid config {origin}:", *lines])


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TesseraConfig:
    """Load YAML (or defaults), apply `section.field=value` overrides, validate."""
    tree: dict = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    overridden: dict[str, str] = {}
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        _set_dotted(tree, dotted.strip(), yaml.safe_load(raw))
        overridden[dotted.strip()] = item
    try:
        return TesseraConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format(e, source, overridden)) from None
