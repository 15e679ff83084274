"""The one config tree of a tessera job, loaded from YAML and validated up front."""

from __future__ import annotations

import contextlib
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tessera.core.config import Strict
from tessera.core.errors import ConfigError
from tessera.core.runtime import RuntimeConfig
from tessera.features.config import CurateConfig, EmbedConfig
from tessera.preprocess.config import ShardConfig
from tessera.train.config import ExportConfig, TrackingConfig, TrainConfig, TuneConfig, with_settings


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


class FallbackConfig(Strict):
    """serve.fallback: where the samples this model is not sure of go (usually the teacher,
    served in the cloud by `tessera serve`), and how hard to try."""

    url: str | None = Field(None, description="a tessera serve service's base URL; null: no fallback")
    min_confidence: float | dict[str, float] = Field(
        0.5, description="a sample whose top probability is under this goes on: one number for the main (first) "
        "(first classification) task, or a threshold per classification task by name")
    timeout_s: float = Field(5.0, gt=0, description="per try")
    retries: int = Field(1, ge=0, description="tries after the first, on a connection error, timeout or 5xx")
    breaker_failures: int = Field(5, gt=0, description="failed requests in a row that open the circuit breaker")
    breaker_cooldown_s: float = Field(30.0, gt=0, description="how long an open breaker sends nothing, then "
                                      "lets one request probe")

    @field_validator("min_confidence")
    @classmethod
    def _probabilities(cls, value):
        for bound in (value.values() if isinstance(value, dict) else (value,)):
            if not 0 <= bound <= 1:
                raise ValueError(f"min_confidence {bound} is not a probability (0 to 1)")
        return value

    def thresholds(self, main_task: str) -> dict[str, float]:
        """Task name -> the top probability under which a sample goes on."""
        return dict(self.min_confidence) if isinstance(self.min_confidence, dict) else {main_task: self.min_confidence}


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
    read_timeout_s: float = Field(10.0, gt=0, description="a request whose body has not arrived by then: 408 "
                                  "(a slow or stalled client holds a replica slot this long at most)")
    max_ongoing_requests: int = Field(256, gt=0, description="requests a replica holds at once; more wait in "
                                      "Serve's queue")
    fallback: FallbackConfig = FallbackConfig()

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                             f"({self.max_batch_size}): a replica could never fill a batch")
        return self


class TesseraConfig(Strict):
    job: JobConfig = JobConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    shard: ShardConfig = ShardConfig()
    embed: EmbedConfig = EmbedConfig()
    curate: CurateConfig = CurateConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _every_trial_trains(self) -> TesseraConfig:
        """Each value tune.space may give (a range's ends) makes a valid train config: a bad
        space fails here, before any trial starts."""
        for key, distribution in self.tune.space.items():
            for value in distribution.extremes():
                try:
                    with_settings(self.train, {key.removeprefix("train."): value})
                except ValidationError as e:
                    problem = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                    raise ValueError(f"tune.space {key} = {excerpt(value)} is not a valid setting "
                                     f"({problem})") from None
                except ValueError as e:
                    raise ValueError(f"tune.space: {e}") from None
        return self


MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is not a config
MAX_CONFIG_VALUES = 100_000  # values a config may expand to, YAML aliases followed
_QUOTE = reprlib.Repr()  # what an error quotes of a value: bounded
_QUOTE.maxstring = _QUOTE.maxother = 120
_QUOTE.maxlist = _QUOTE.maxdict = 8
_QUOTE.maxlevel = 3


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing what a config never needs: a key given twice in one mapping
    (YAML keeps the last one silently), and aliases that expand to more than MAX_CONFIG_VALUES
    values (a "billion laughs" document is small on disk and enormous once followed)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # (an unhashable key: YAML's own error says so)
                if key in seen:
                    raise ConfigError(f"key {key!r} is given twice (lines {seen[key]} and "
                                      f"{key_node.start_mark.line + 1}): give it once")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# YAML 1.2's floats: PyYAML (YAML 1.1) reads `lr: 1e-4` (no dot) as the string "1e-4"
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _expanded_values(node, memo: dict) -> int:
    """How many values NODE stands for with every alias followed (each node counted once per
    path to it, in time proportional to the distinct nodes)."""
    if id(node) not in memo:
        memo[id(node)] = 1
        children = node.value if isinstance(node.value, list) else ()
        items = [v for pair in children for v in pair] if isinstance(node, yaml.MappingNode) else children
        memo[id(node)] = 1 + sum(_expanded_values(child, memo) for child in items)
    return memo[id(node)]


def _load_yaml(text: str, where: str) -> Any:
    """TEXT as YAML (_ConfigLoader), or ConfigError naming WHERE and what is wrong."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_values(node, {})
        if values > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where} expands to {values:,} values (YAML aliases followed), more than a config "
                              f"holds ({MAX_CONFIG_VALUES:,})")
        return loader.construct_document(node)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if not str(e).startswith(where) else str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    finally:
        loader.dispose()


def excerpt(value: Any) -> str:
    """VALUE as an error message may quote it: a bounded repr (a long string's start, a few items
    of a large structure)."""
    return _QUOTE.repr(value)


def _format(err: ValidationError, source: str, overridden: dict[str, str]) -> str:
    """Each bad field with what is wrong, and where its value came from: an --set, or SOURCE."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" else f" (got {excerpt(e['input'])})"
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


def _read_config(path: str | Path) -> dict:
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is {size:,} bytes, more than a config holds ({MAX_CONFIG_BYTES:,})")
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text ({e.reason} at byte {e.start + 1})") from None
    tree = _load_yaml(text, f"config {path}") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TesseraConfig:
    """Load YAML (or defaults), apply `section.field=value` overrides, validate."""
    tree: dict = _read_config(path) if path is not None else {}
    source = str(path) if path is not None else "(defaults)"
    overridden: dict[str, str] = {}
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        _set_dotted(tree, dotted.strip(), _load_yaml(raw, f"--set {item}"))
        overridden[dotted.strip()] = item
    try:
        return TesseraConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format(e, source, overridden)) from None
