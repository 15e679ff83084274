"""`tessera` command line: one subcommand per job, each loading and validating the config first."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from workflows.config import ConfigError, TesseraConfig, load_config

EXIT_CONFIG = 2
EXIT_CONFLICT = 3
EXIT_FAILED_CHECK = 4  # a stage wrote its outputs, but they fail a check the config sets (rejects, errors)
EXIT_LOCKED = 75  # EX_TEMPFAIL: another writer holds the output folder; a scheduler retries later


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults apply to what it leaves out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one config field, e.g. --set shard.image.size=256 (repeatable)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--workers", type=int, help="CPUs of the local Ray (runtime.workers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--wait", action="store_true",
                        help="wait for an output folder another writer holds (default: exit 75 at once)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    shard = sub.add_parser("shard", help="manifest -> validated, normalized WebDataset shards")
    shard.add_argument("manifest", help="JSONL or Parquet manifest, any fsspec URL")
    shard.add_argument("out", help="output folder, any fsspec URL")
    shard.add_argument("--samples-per-shard", type=int, help="shard.samples_per_shard")
    shard.add_argument("--seed", type=int, help="shard.seed")
    _common(shard)
    rejects = sub.add_parser("rejects", help="every rejected input of a shard output: one JSON line each "
                                             "(key, file, line, modality, reason)")
    rejects.add_argument("out", help="a shard stage's output folder, any fsspec URL")
    _common(rejects)
    embed = sub.add_parser("embed", help="committed shards -> per-modality embeddings (cached by content)")
    embed.add_argument("shards", help="a shard stage's output folder, any fsspec URL")
    embed.add_argument("--batch-size", type=int, help="embed.batch_size")
    _common(embed)
    curate = sub.add_parser("curate", help="embedded shards -> semantic duplicates and outliers dropped or listed "
                            "(curate.semantic, curate.outliers)")
    curate.add_argument("shards", help="a shard stage's output folder, embedded")
    _common(curate)
    run = sub.add_parser("run", help="the whole chain shard -> embed -> train; up-to-date stages are skipped")
    run.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML config with a job section")
    run.add_argument("--dry-run", action="store_true",
                     help="the bundled sample corpus with small limits on an embedded local Ray")
    _common(run)
    refresh = sub.add_parser("refresh", help="scheduled: shard and embed only new or changed manifest rows "
                                        "as a new version, then train it if job.refresh_train says so "
                                        "(exit 0 done, 75 locked: retry later)")
    refresh.add_argument("config_file", metavar="CONFIG", help="YAML config with a job section")
    _common(refresh)
    versions = sub.add_parser("versions", help="the dataset versions under OUT: rows added, changed and removed, "
                                               "inputs, accepted, rejected, shards, validation accuracy")
    versions.add_argument("out", help="the job's output root (job.out)")
    _common(versions)
    train = sub.add_parser("train", help="DeepSpeed training on the shards and their embeddings, on Ray")
    train.add_argument("shards", help="a shard stage's output folder, embedded")
    train.add_argument("--run-dir", help="checkpoints, metrics and the exported model (default: runs/NAME)")
    _common(train)
    evaluate = sub.add_parser("evaluate", help="metrics of a trained run on its validation split (and other shards)")
    evaluate.add_argument("run", help="a training run folder (OUT/train/<digest>, runs/NAME)")
    evaluate.add_argument("--shards", action="append", default=[], metavar="URL",
                          help="also evaluate every labelled sample of these committed shards (repeatable)")
    _common(evaluate)
    export = sub.add_parser("export", help="a trained run -> safetensors + ONNX (fp32, int8, pruned) to serve")
    export.add_argument("run", help="a training run folder")
    export.add_argument("out", help="export folder, any fsspec URL")
    _common(export)
    predict = sub.add_parser("predict", help="an exported model on raw files or a manifest: one JSON line each")
    predict.add_argument("model", help="an export folder (tessera export)")
    predict.add_argument("inputs", nargs="+", help="a .jsonl/.parquet manifest, or files / folders of files "
                                                   "(files sharing a name stem are one sample)")
    predict.add_argument("--variant", default="fp32", choices=["fp32", "int8", "pruned"])
    predict.add_argument("--out", help="write the JSON lines here instead of stdout")
    _common(predict)
    serve = sub.add_parser("serve", help="an exported model as an HTTP prediction service (Ray Serve, batched)")
    serve.add_argument("model", help="an export folder (tessera export)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--replicas", type=int, help="serve.replicas")
    serve.add_argument("--variant", default="fp32", choices=["fp32", "int8", "pruned"])
    serve.add_argument("--max-batch-size", type=int, help="serve.max_batch_size")
    serve.add_argument("--batch-wait-ms", type=float, help="serve.batch_wait_ms")
    _common(serve)
    return parser


DRY_RUN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def config_from_args(args: argparse.Namespace) -> TesseraConfig:
    overrides = list(args.overrides)
    if getattr(args, "dry_run", False):
        from workflows.jobs import bundled_manifest

        args.config = args.config or args.config_file or (str(DRY_RUN_CONFIG) if DRY_RUN_CONFIG.exists() else None)
        overrides = [f"job.manifest={json.dumps(bundled_manifest())}", "job.out=out/dry-run",
                     "runtime.address=null", *overrides]
    elif getattr(args, "config_file", None):
        args.config = args.config or args.config_file
    for flag, field in (("address", "runtime.address"), ("workers", "runtime.workers"),
                        ("samples_per_shard", "shard.samples_per_shard"), ("seed", "shard.seed"),
                        ("batch_size", "embed.batch_size"), ("replicas", "serve.replicas"),
                        ("max_batch_size", "serve.max_batch_size"), ("batch_wait_ms", "serve.batch_wait_ms")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{field}={json.dumps(value)}")
    if args.no_progress:
        overrides.append("runtime.progress=false")
    if args.wait:
        overrides.append("runtime.lease.wait=true")
    return load_config(args.config, overrides)


@contextlib.contextmanager
def writing(folder, cfg: TesseraConfig, command: str):
    """FOLDER's lease, then Ray: a command that finds its folder held exits 75 before it starts Ray."""
    from preprocess.lease import Lease
    from workflows.runtime import start_ray

    with Lease(folder, cfg.runtime.lease, command) as fence:
        start_ray(cfg.runtime)
        yield fence


def cmd_shard(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from preprocess.layout import current_summary
    from preprocess.manifest import ManifestSource

    out = cfg.runtime.store(args.out)
    # an OUT that is complete for this manifest and config is known from metadata: no Ray
    summary = current_summary(out, cfg.shard, ManifestSource.open(args.manifest, out))
    if summary is None:
        from preprocess.stage import run_shard_stage

        with writing(out, cfg, "tessera shard") as fence:
            summary = run_shard_stage(args.manifest, out, cfg.shard, cfg.runtime.progress, fence)
    record = summary.to_json()
    print(json.dumps({k: record[k] for k in ("inputs", "accepted", "rejected", "shards", "samples_per_s",
                                             "up_to_date")}))
    return 0


def cmd_rejects(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from preprocess.layout import reject_batches

    for batch in reject_batches(cfg.runtime.store(args.out)):
        for record in batch.to_pylist():
            print(json.dumps(record))
    return 0


def cmd_embed(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from features.stage import run_embed_stage

    shards = cfg.runtime.store(args.shards)
    with writing(shards, cfg, "tessera embed") as fence:
        summary = run_embed_stage(shards, cfg.embed, progress=cfg.runtime.progress, lease=fence)
    print(json.dumps({"samples": summary.samples, "computed": summary.computed, "cache_hits": summary.cache_hits,
                      "seconds": summary.seconds}))
    return 0


def cmd_curate(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from features.curate import run_curate_stage

    if not cfg.curate.enabled:
        raise ConfigError("tessera curate has nothing to do: set curate.semantic.modalities or "
                          "curate.outliers.modalities")
    shards = cfg.runtime.store(args.shards)
    with writing(shards, cfg, "tessera curate") as fence:
        summary = run_curate_stage(shards, cfg.curate, progress=cfg.runtime.progress, lease=fence)
    print(json.dumps({k: v for k, v in summary.to_json().items() if k != "histogram"}))
    return 0


def cmd_train(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from train.stage import run_train_stage

    run_dir = args.run_dir or str(Path("runs") / Path(args.shards.rstrip("/")).name)
    shards = cfg.runtime.store(args.shards)
    with writing(shards.at(run_dir), cfg, "tessera train") as fence:
        summary = run_train_stage(shards, shards.at(run_dir), cfg.train, fence)
    record = summary.to_json()
    print(json.dumps({k: record[k] for k in ("steps", "final_loss", "val_accuracy", "val_tasks", "model")}))
    return 0


def cmd_run(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from workflows.jobs import run_pipeline

    if args.dry_run:  # always the embedded local Ray, whatever the environment points at
        os.environ.pop("RAY_ADDRESS", None)
    if not cfg.job.out:
        raise ConfigError("tessera run needs job.manifest and job.out in the config (or --dry-run)")
    out = cfg.runtime.store(cfg.job.out)
    with writing(out, cfg, "tessera run") as fence:
        report = run_pipeline(cfg, out, fence)
    print(json.dumps({stage: {"up_to_date": s["up_to_date"]} for stage, s in report["stages"].items()}
                     | {"seconds": report["seconds"]}))
    return 0


def cmd_refresh(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from workflows.refresh import run_refresh
    from workflows.runtime import start_ray

    if not cfg.job.out:
        raise ConfigError("tessera refresh needs job.manifest and job.out in the config")
    # the lease first: a refresh that finds another running exits without starting Ray
    result = run_refresh(cfg, cfg.runtime.store(cfg.job.out), start=lambda: start_ray(cfg.runtime))
    trained = {"val_accuracy": result["train"].val_accuracy} if "train" in result else {}
    counts = {k: result[k] for k in ("added", "changed", "removed") if k in result}
    print(json.dumps({"version": result["version"], "new_rows": result["new_rows"], **counts, **trained}))
    return 0


def cmd_versions(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from workflows.refresh import versions

    for version in versions(cfg.runtime.store(args.out)):
        print(json.dumps(version))
    return 0


def cmd_evaluate(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from train.evaluate import evaluate_run, headline
    from train.tasks import tasks_from_meta
    from workflows.report import write_run_report

    run = cfg.runtime.store(args.run)
    result = evaluate_run(run, [run.at(url) for url in args.shards], cfg.export.batch_size, cfg.runtime.lease)
    write_run_report(run)
    tasks = tasks_from_meta(result["tasks"])
    for name, metrics in result["sets"].items():
        print(json.dumps({"set": name, "samples": metrics["samples"], "tasks": {
            t.name: {**headline(t, metrics["tasks"][t.name]), "ablation": metrics["tasks"][t.name]["ablation"]}
            for t in tasks}}))
    return 0


def cmd_export(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from train.export import export_run

    run = cfg.runtime.store(args.run)
    result = export_run(run, run.at(args.out), cfg.export, cfg.runtime.lease)
    for name, variant in result["variants"].items():
        print(json.dumps({"variant": name, **{k: variant.get(k) for k in (
            "file", "bytes", "size_ratio_vs_fp32", "tasks", "within_tolerance")}}))
    if "distillation" in result:
        print(json.dumps({"distillation": result["distillation"]}))
    return 0


def cmd_predict(args: argparse.Namespace, cfg: TesseraConfig) -> int:
    from workflows.predict import Predictor, predict_inputs

    predictor = Predictor(cfg.runtime.store(args.model), args.variant, cfg.embed.batch_size)
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
    from train.layout import META
    from workflows.runtime import start_ray
    from workflows.serve import run_service

    model = cfg.runtime.store(args.model)
    if not model.exists(META):
        raise FileNotFoundError(f"{model.url} is not an export (no {META}): make one with tessera export RUN OUT")
    start_ray(cfg.runtime)
    run_service(cfg, model.url, args.variant, args.host, args.port)
    return 0


COMMANDS = {"shard": cmd_shard, "rejects": cmd_rejects, "embed": cmd_embed, "curate": cmd_curate, "train": cmd_train,
            "run": cmd_run,
            "refresh": cmd_refresh, "versions": cmd_versions, "evaluate": cmd_evaluate, "export": cmd_export,
            "predict": cmd_predict, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"tessera: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from preprocess.layout import OutputConflict
    from preprocess.lease import LeaseHeld
    from preprocess.summary import StageFailed

    try:
        return COMMANDS[args.command](args, cfg)
    except LeaseHeld as e:
        print(f"tessera: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except StageFailed as e:
        print(f"tessera: {e}", file=sys.stderr)
        return EXIT_FAILED_CHECK
    except OutputConflict as e:
        print(f"tessera: {e}", file=sys.stderr)
        return EXIT_CONFLICT
    except (ConfigError, FileNotFoundError) as e:  # a bad config, or an input that is not there
        print(f"tessera: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
