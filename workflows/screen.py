"""What a person sees: tessera's own log lines and errors (everything else in a log file, or
live with -v), and at the end of a command a short table of what each stage did and the
paths of what was written (rich). With --json, and whenever stdout is not a terminal, the
command's machine-readable record goes to stdout (the table then goes to stderr), so scripts
and schedules keep reading one JSON line."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from tessera.preprocess.stats import medical_text

TOP_REASONS = 3


OURS = ("tessera", "__main__")


class _Stderr(logging.StreamHandler):
    """To whatever sys.stderr is when a record comes (not the one it was when set up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def setup_logging(verbose: bool) -> Path:
    """Every record (INFO and up, Python warnings too) to a driver log file; on the terminal
    tessera's own records and anybody's errors, or everything with VERBOSE. Returns the file."""
    path = Path(tempfile.mkdtemp(prefix="tessera-logs-")) / "driver.log"
    form = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_file, to_terminal = logging.FileHandler(path), _Stderr()
    for handler in (to_file, to_terminal):
        handler.setFormatter(form)
    if not verbose:
        to_terminal.addFilter(lambda r: r.levelno >= logging.ERROR or r.name.split(".")[0] in OURS)
        # transformers writes past logging's root (its own handler) and draws "Loading weights" bars
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "tessera", False)]  # an earlier command's
    for handler in (to_file, to_terminal):
        handler.tessera = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return path


@dataclass
class Screen:
    """The end-of-command summary: one row per stage (name, what it did, seconds), then paths."""

    title: str
    rows: list[tuple[str, str, float | None]] = field(default_factory=list)
    paths: list[tuple[str, str]] = field(default_factory=list)

    def stage(self, name: str, text: str, seconds: float | None = None) -> None:
        self.rows.append((name, text, seconds))

    def path(self, what: str, where: str) -> None:
        self.paths.append((what, where))

    def table(self) -> Table:
        table = Table(title=self.title, title_justify="left", show_header=True, header_style="bold",
                      expand=False, pad_edge=False)
        table.add_column("stage", no_wrap=True)
        table.add_column("result", overflow="fold")
        table.add_column("time", justify="right", no_wrap=True)
        for name, text, seconds in self.rows:
            table.add_row(name, text, "" if seconds is None else f"{seconds:.1f} s")
        for what, where in self.paths:
            table.add_row(what, where, "", style="dim")
        return table


def show(screen: Screen, record: dict, as_json: bool) -> None:
    """The table for a person, the JSON record for a program (see the module doc)."""
    if as_json:
        print(json.dumps(record), flush=True)
        return
    to_terminal = sys.stdout.isatty()
    console = Console(file=sys.stdout if to_terminal else sys.stderr, width=110, highlight=False)
    console.print(screen.table())
    if not to_terminal:
        print(json.dumps(record), flush=True)


def _prefix(summary: dict) -> str:
    return "up to date: " if summary.get("up_to_date") else ""


def shard_text(s: dict) -> str:
    reasons = sorted(s["rejected_by_code"].items(), key=lambda kv: -kv[1])[:TOP_REASONS]
    top = "; ".join(f"{reason} x{n}" for reason, n in reasons)
    reasons_text = f" ({top})" if top else ""
    return (f"{_prefix(s)}{s['inputs']} inputs: {s['accepted']} accepted, {s['rejected']} rejected{reasons_text}"
            f" ({s['duplicates']} of them duplicates); {s['shards']} shards, {decimal(s['bytes'])}"
            f"{medical_text(s.get('statistics') or {})}")


def embed_text(s: dict) -> str:
    if s.get("up_to_date"):
        return f"up to date: {s['samples']} samples, {s['sidecars_up_to_date']} sidecars current"
    errors = f", {s['errors']} failed" if s.get("errors") else ""
    return (f"{s['samples']} samples: {s['computed']} vectors computed, {s['cache_hits']} vectors from the "
            f"cache{errors}; {s['sidecars_written']} sidecars written")


def curate_text(s: dict) -> str:
    parts = [f"{m}: {s['clusters'].get(m, 0)} clusters, {n} semantic duplicates"
             for m, n in s["semantic_duplicates"].items()]
    parts += [f"{m}: {n} outliers {'dropped' if s['outliers_dropped'] else 'listed'}"
              for m, n in s["outliers"].items()]
    return _prefix(s) + ("; ".join(parts) or "nothing configured")


SMALL_VALIDATION = 100  # fewer validation samples than this: a figure says how much it can tell


def _metrics(val_tasks: dict | None) -> str:
    """Each task's validation figure; a classification's with its chance level (1 / classes)."""
    shown = []
    for task, record in (val_tasks or {}).items():
        metric = next((k for k in ("accuracy", "micro_f1", "mae") if record.get(k) is not None), None)
        if metric is not None:
            chance = f" (chance {record['chance']:.3f})" if record.get("chance") is not None else ""
            shown.append(f"{task} {metric} {record[metric]:.3f}{chance}")
    return ", ".join(shown)


def train_text(s: dict) -> str:
    loss = "" if s.get("final_loss") is None else f", loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}"
    metrics = _metrics(s.get("val_tasks"))
    few = ", too few to judge a model by" if s["val_samples"] < SMALL_VALIDATION else ""
    validation = f"; validation ({s['val_samples']} samples{few}): {metrics}" if metrics else ""
    stages = "; pipeline " + " | ".join(s["pipeline_stages"]) if s.get("pipeline_stages") else ""
    return f"{_prefix(s)}{s['steps']} steps on {s['train_samples']} samples{loss}{validation}{stages}"


def tune_text(s: dict) -> str:
    trials = (f"{s['trials']} trials ({s['search']}, {s['scheduler']}): {s['completed']} completed, "
              f"{s['stopped_early']} stopped early, {s['failed']} failed; {s['trial_epochs']} trial-epochs")
    if s["best_trial"] is None:
        return f"{_prefix(s)}{trials}; no trial completed"
    settings = ", ".join(f"{k.removeprefix('train.')}={v:.4g}" if isinstance(v, float) else
                         f"{k.removeprefix('train.')}={v}" for k, v in s["best_settings"].items())
    return f"{_prefix(s)}{trials}; best {s['metric']} {s['best_value']:.4f} with {settings}"


STAGE_TEXT = {"shard": shard_text, "embed": embed_text, "curate": curate_text, "train": train_text,
              "tune": tune_text}


def stages_screen(title: str, stages: dict[str, dict]) -> Screen:
    screen = Screen(title)
    for name, summary in stages.items():
        screen.stage(name, STAGE_TEXT[name](summary), summary.get("seconds"))
    return screen
