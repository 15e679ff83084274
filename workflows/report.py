"""report.html of a run: the data itself (per label a strip of sample thumbnails with their
captions, audio players and video poster frames; per reject reason its count and a few
examples) and PNG plots (matplotlib) of the data, the stages and training, all inlined so the
page is one file that opens anywhere. What it shows is a fixed sample (SHOWN_PER_LABEL per
label, SHOWN_LABELS labels, SHOWN_REJECTS per reason, thumbnails THUMB pixels): its size is
bounded whatever the corpus."""

from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import json
import textwrap
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from tessera.core.storage import Store  # noqa: E402
from tessera.core.versions import INDEX  # noqa: E402
from tessera.features.layout import CURATED, OUTLIERS, CurateSummary, EmbedSummary, read_sidecar  # noqa: E402
from tessera.preprocess.layout import (  # noqa: E402
    DUPLICATES,
    ShardSummary,
    committed_shards,
    index_batches,
    iter_shard,
    member_payload,
    read_index_part,
    reject_batches,
)
from tessera.preprocess.modality import MODALITIES  # noqa: E402
from tessera.preprocess.reject import CODES  # noqa: E402
from tessera.train.evaluate import headline  # noqa: E402
from tessera.train.layout import EVAL, METRICS, TrainSummary  # noqa: E402
from tessera.train.tasks import VALIDATION_METRIC, tasks_from_meta  # noqa: E402
from tessera.workflows.layout import REPORT, SHARDS  # noqa: E402

SAMPLE_ROWS = 2000  # embeddings the report's plots are drawn from
SHOWN_GROUPS = 12  # near-duplicate groups (and half as many semantic pairs, outliers) shown
SHOWN_PER_GROUP = 5  # dropped copies shown beside each kept image
SHOWN_LABELS, SHOWN_PER_LABEL, SHOWN_REJECTS, SHOWN_REASONS = 12, 6, 3, 12
THUMB = 96  # pixels, the longer side of a thumbnail
MAX_AUDIO_BYTES = 200_000  # a clip inlined as a player (one per label at most); longer ones are named


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _bars(counts: dict, title: str, horizontal: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels, values = list(counts), list(counts.values())
    (ax.barh if horizontal else ax.bar)(labels, values, color="#4C72B0")
    ax.set_title(title)
    if not horizontal:
        ax.tick_params(axis="x", rotation=30)
    return _png(fig)


def embedding_sample(shards: Store, size: int = SAMPLE_ROWS, seed: int = 0) -> list[dict]:
    """A fixed-size, seeded sample of the kept samples' embeddings (with their labels): the
    SIZE keys of smallest sha256(seed, key), gathered shard by shard with a bounded heap, so
    it is the same whatever the shard order and never holds more than SIZE rows. A sidecar's
    keys are read first; its vectors only when some of its rows enter the sample."""
    heap: list[tuple[int, int, dict]] = []  # (-priority, tie, row): the largest priority on top
    modalities = MODALITIES
    for n, name in enumerate(committed_shards(shards)):
        try:
            keys = read_sidecar(shards, name, ["key"]).column("key").to_pylist()
        except FileNotFoundError:  # not embedded (yet)
            continue
        entering = []
        for i, key in enumerate(keys):
            priority = int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big")
            if len(heap) < size or -heap[0][0] > priority:  # (a superset: the heap as this shard began)
                entering.append((priority, i, key))
        if not entering:
            continue
        table = read_sidecar(shards, name)
        labels = dict(zip(*(read_index_part(shards, name, ["key", "label"]).column(c).to_pylist()
                            for c in ("key", "label")), strict=True))
        columns = [m for m in modalities if m in table.column_names]
        for priority, i, key in entering:
            if len(heap) == size and -heap[0][0] <= priority:
                continue
            row = {"key": key, "label": labels.get(key), **{m: table.column(m)[i].as_py() for m in columns}}
            item = (-priority, n * 10**9 + i, row)
            heapq.heappush(heap, item) if len(heap) < size else heapq.heapreplace(heap, item)
    return [row for _, _, row in sorted(heap, key=lambda item: -item[0])]


def _embedding_plots(shards: Store) -> list[tuple[str, str]]:
    sample = embedding_sample(shards)
    if not sample:
        return []
    plots = []
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for modality in MODALITIES:
        vectors = [r[modality] for r in sample if r.get(modality) is not None]
        if vectors:
            norms = np.linalg.norm(np.asarray(vectors, np.float32), axis=1)
            # normalized embeddings (MiniLM's) all have norm 1: one bin, not twenty empty ones
            ax.hist(norms, bins=20 if np.ptp(norms) > 1e-3 else 1, alpha=0.6, label=modality)
    ax.set_title(f"embedding norms ({len(sample)} samples, seeded)")
    ax.legend()
    plots.append(("Embedding norms per modality", _png(fig)))
    rows = [r for r in sample if r.get("text") is not None]
    if len(rows) >= 3:
        x = np.asarray([r["text"] for r in rows], np.float32)
        x = x - x.mean(0)
        projected = x @ np.linalg.svd(x, full_matrices=False)[2][:2].T  # PCA to 2-D
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [r["label"] or "none" for r in rows]
        for label in sorted(set(labels)):
            mine = np.array([lab == label for lab in labels])
            ax.scatter(projected[mine, 0], projected[mine, 1], s=14, label=label)
        ax.set_title(f"text embeddings, PCA 2-D, coloured by label ({len(rows)} samples, seeded)")
        ax.legend(fontsize=7)
        plots.append(("Text embeddings projected to 2-D", _png(fig)))
    return plots


def _members(shards: Store, wanted: dict[str, set[str]], modality: str) -> dict[str, bytes]:
    """The MODALITY payload of the WANTED keys, by shard (dropped rows are still in their tars)."""
    found = {}
    for shard, keys in wanted.items():
        for sample in iter_shard(shards, shard, lambda name, keys=keys: name.split(".", 1)[0] in keys):
            payload = member_payload(sample, modality)
            if payload is not None:
                found[sample["__key__"]] = payload
    return found


def _shown(payload: bytes | None, modality: str, ax, caption: str) -> None:
    """A thumbnail (image) or wrapped text on AX."""
    ax.set_axis_off()
    ax.set_title(caption, fontsize=7)
    if payload is None:
        return
    if modality == "image":
        from PIL import Image

        ax.imshow(Image.open(io.BytesIO(payload)).convert("RGB"))
    else:
        ax.text(0, 0.5, textwrap.fill(payload.decode(errors="replace")[:160], 28), fontsize=6, va="center")


def _grid(groups: list[list[tuple[str, str]]], payloads: dict[str, bytes], modality: str, title: str) -> str:
    """Rows of (key, caption) cells, each shown by _shown."""
    width = max(len(g) for g in groups)
    fig, axes = plt.subplots(len(groups), width, figsize=(1.6 * width, 1.7 * len(groups)), squeeze=False)
    for row, group in zip(axes, groups, strict=True):
        for ax, cell in zip(row, group + [None] * (width - len(group)), strict=True):
            if cell is None:
                ax.set_axis_off()
            else:
                _shown(payloads.get(cell[0]), modality, ax, cell[1])
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def _shards_of(shards: Store, keys: set[str]) -> dict[str, set[str]]:
    """The shards of these kept or dropped KEYS, from the index parts."""
    import pyarrow.dataset as ds

    where: dict[str, set[str]] = {}
    for name in shards.names(f"{INDEX}/shard-*.parquet"):
        table = shards.read_parquet(name, ["key", "shard"], ds.field("key").isin(list(keys)))
        for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist(), strict=True):
            where.setdefault(shard, set()).add(key)
    return where


def curation_plots(shards: Store) -> list[tuple[str, str]]:
    """Near-duplicate image groups (the kept image and its dropped copies), each compared
    modality's histogram of highest within-cluster cosine with the eps line and a few pairs,
    and the outliers with their scores."""
    plots = []
    if shards.exists(DUPLICATES):
        dropped = shards.read_parquet(DUPLICATES)
        near = [r for r in dropped.to_pylist() if r["code"] == "dedup.near_duplicate" and r["modality"] == "image"]
        groups: dict[str, list[tuple[str, str]]] = {}
        for r in near:
            groups.setdefault(r["duplicate_of"], []).append((r["sample_key"], r["measure"]))
        largest = sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))[:SHOWN_GROUPS]
        if largest:
            rows = [[(kept, f"kept {kept}"), *copies[:SHOWN_PER_GROUP]] for kept, copies in largest]
            keys = {key for row in rows for key, _ in row}
            payloads = _members(shards, _shards_of(shards, keys), "image")
            title = f"image near-duplicates: {len(groups)} groups, largest first"
            plots.append(("Image near-duplicates", _grid(rows, payloads, "image", title)))
    if not CurateSummary.exists(shards):
        return plots
    curated = CurateSummary.read(shards)
    dropped = shards.read_parquet(CURATED).to_pylist() if shards.exists(CURATED) else []
    for modality, counts in curated.histogram.items():
        fig, ax = plt.subplots(figsize=(6, 3.2))
        edges = np.linspace(-1, 1, len(counts) + 1)
        ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="#4C72B0")
        ax.axvline(1 - curated.eps, color="#C44E52", linestyle="--", label=f"1 - eps = {1 - curated.eps:.2f}")
        ax.set_title(f"{modality}: each sample's highest cosine within its cluster")
        ax.legend(fontsize=7)
        plots.append((f"{modality}: highest within-cluster cosine", _png(fig)))
        pairs = sorted((r for r in dropped if r["modality"] == modality and r["duplicate_of"]),
                       key=lambda r: -(r["cosine"] or 0))[:SHOWN_GROUPS // 2]
        if pairs:
            rows = [[(r["duplicate_of"], f"kept {r['duplicate_of']}"), (r["sample_key"], f"cosine {r['cosine']:.3f}")]
                    for r in pairs]
            payloads = _members(shards, _shards_of(shards, {k for row in rows for k, _ in row}), modality)
            plots.append((f"{modality}: semantic duplicates", _grid(rows, payloads, modality,
                                                                   f"{modality}: semantic duplicate pairs")))
    if shards.exists(OUTLIERS):
        flagged = sorted(shards.read_parquet(OUTLIERS).to_pylist(), key=lambda r: -r["score"])[:SHOWN_GROUPS]
        for modality in sorted({r["modality"] for r in flagged}):
            mine = [(r["sample_key"], f"score {r['score']:.1f}") for r in flagged if r["modality"] == modality]
            payloads = _members(shards, _shards_of(shards, {k for k, _ in mine}), modality)
            plots.append((f"{modality}: outliers", _grid([mine], payloads, modality,
                                                         f"{modality}: outliers (robust score)")))
    return plots


def _training_plots(run: Store) -> list[tuple[str, str]]:
    """Each task's training loss, and its headline validation metric per epoch."""
    if not run.exists(METRICS):
        return []
    records = [json.loads(line) for line in run.read_bytes(METRICS).decode().splitlines()]
    steps = [r for r in records if r.get("loss") is not None]
    epochs = [r for r in records if "val_tasks" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="total (weighted)")
    for task in steps[0]["task_loss"] if steps and len(steps[0]["task_loss"]) > 1 else ():
        left.plot([r["step"] for r in steps], [r["task_loss"][task] for r in steps], label=task, linewidth=0.8)
    left.set_title("training loss")
    left.set_xlabel("step")
    left.legend(fontsize=7)
    for task in epochs[0]["val_tasks"] if epochs else ():
        metric = next(m for m in VALIDATION_METRIC.values() if m in epochs[0]["val_tasks"][task])
        right.plot([r["epoch"] for r in epochs], [r["val_tasks"][task][metric] for r in epochs], marker="o",
                   label=f"{task} ({metric})")
    right.set_title("validation")
    right.set_xlabel("epoch")
    right.legend(fontsize=7)
    return [("Training", _png(fig))]


def _confusion(name: str, result: dict, labels: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    matrix = np.asarray(result["confusion_matrix"])
    ax.imshow(matrix, cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name}: confusion matrix, {result['samples']} validation samples")
    return _png(fig)


def _roc(name: str, curves: dict, per_class: dict) -> str:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, curve in curves.items():
        ax.plot(curve["fpr"], curve["tpr"], label=f"{label} (AUC {per_class[label]['roc_auc']:.2f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{name}: ROC, one class vs the rest")
    ax.legend(fontsize=7)
    return _png(fig)


def _evaluation_plots(run: Store) -> list[tuple[str, str]]:
    """Per task of RUN/eval.json's validation set: confusion matrix and ROC curves
    (classification), per-tag F1 (multilabel), the error metrics (regression), and the
    modality ablation of its headline metric."""
    if not run.exists(EVAL):
        return []
    result = run.read_json(EVAL)
    val = result["sets"]["val"]
    plots = []
    for task in tasks_from_meta(result["tasks"]):
        mine = val["tasks"][task.name]
        if not mine["samples"]:
            continue
        if task.kind == "classification":
            plots.append((f"{task.name}: confusion matrix", _confusion(task.name, mine, list(task.labels))))
            plots.append((f"{task.name}: ROC curves", _roc(task.name, mine["roc_curves"], mine["per_class"])))
        elif task.kind == "multilabel":
            plots.append((f"{task.name}: F1 per tag", _bars({t: v["f1"] for t, v in mine["per_tag"].items()},
                                                           f"{task.name}: F1 per tag (micro {mine['micro_f1']:.2f})")))
        else:
            plots.append((f"{task.name}: errors", _bars({m: mine[m] or 0.0 for m in ("mae", "rmse", "r2")},
                                                       f"{task.name}: regression, {mine['samples']} samples")))
        metric = headline(task, mine)
        first = next(iter(metric))
        ablation = {"all": mine[first] or 0.0} | {f"no {m}": a[first] or 0.0 for m, a in mine["ablation"].items()}
        plots.append((f"{task.name}: modality ablation",
                      _bars(ablation, f"{task.name}: validation {first} with one modality masked")))
    for way, recall in val.get("retrieval", {}).items():  # a contrastive model's zero-shot retrieval
        plots.append((f"retrieval {way}", _bars({k: v or 0.0 for k, v in recall.items() if k != "samples"},
                                                f"{way}: validation recall@k, {recall['samples']} pairs")))
    if result.get("cascade"):
        plots.append(("cascade: accuracy vs share forwarded", _cascade(result["cascade"])))
    return plots


def _cascade(cascade: dict) -> str:
    """The edge-cloud cascade's accuracy against the share of samples it forwards, one point
    per threshold, beside the edge alone, the cloud alone and the recommended threshold."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    curve = cascade["curve"]
    ax.plot([p["forwarded"] for p in curve], [p["accuracy"] for p in curve], marker=".", label="cascade")
    ax.scatter([0], [cascade["edge_accuracy"]], color="tab:orange", zorder=3, label="edge alone")
    ax.scatter([1], [cascade["cloud_accuracy"]], color="tab:green", zorder=3, label="cloud alone")
    best = cascade["recommended"]
    ax.scatter([best["forwarded"]], [best["accuracy"]], color="tab:red", marker="*", s=120, zorder=4,
               label=f"min_confidence {best['threshold']:.2f}")
    ax.set_xlabel("share forwarded to the cloud")
    ax.set_ylabel(f"{cascade['task']} accuracy")
    ax.set_title(f"cascade on {cascade['samples']} validation samples")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _thumbnail(image: bytes | None = None, frames: np.ndarray | None = None) -> str | None:
    """A small JPEG data URL of an image payload, or of a clip's first frame (its poster)."""
    from PIL import Image

    try:
        picture = Image.fromarray(frames[0]) if frames is not None else Image.open(io.BytesIO(image)).convert("RGB")
    except Exception:  # an input that does not decode has no thumbnail, only its reason
        return None
    picture.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _payloads(shards: Store, shard_keys: dict[str, set[str]]) -> dict[str, dict]:
    """The members of the KEYS (by shard) by key and extension, read once per shard."""
    found: dict[str, dict] = {}
    for shard, keys in shard_keys.items():
        for sample in iter_shard(shards, shard, lambda name, keys=keys: name.split(".", 1)[0] in keys):
            found[sample["__key__"]] = sample
    return found


def _card(key: str, sample: dict, caption: str, audio_left: list[int]) -> str:
    """One sample as HTML: thumbnail (image, or a clip's poster frame), caption, audio player."""
    from tessera.preprocess.video import decode_frames

    image, video = member_payload(sample, "image"), member_payload(sample, "video")
    thumb = _thumbnail(image) if image else _thumbnail(frames=decode_frames(video)) if video else None
    parts = [f'<img class="thumb" alt="{html.escape(key)}" src="{thumb}">' if thumb else ""]
    parts.append(f"<b>{html.escape(key)}</b> {html.escape(caption[:140])}")
    if video:
        parts.append("<small>video: poster frame</small>" if not image else "<small>+ video</small>")
    audio = member_payload(sample, "audio")
    if audio and len(audio) <= MAX_AUDIO_BYTES and audio_left[0]:
        audio_left[0] -= 1
        kind = "flac" if audio[:4] == b"fLaC" else "wav"
        parts.append(f'<audio controls src="data:audio/{kind};base64,{base64.b64encode(audio).decode()}"></audio>')
    elif audio:
        parts.append(f"<small>audio ({len(audio) // 1000} kB)</small>")
    return f'<div class="card">{"<br>".join(p for p in parts if p)}</div>'


def sample_strips(shards: Store) -> str:
    """Per label (the first SHOWN_LABELS by count), SHOWN_PER_LABEL of its samples as cards."""
    chosen: dict[str, list[tuple[str, str, str]]] = {}
    counts: Counter = Counter()
    for batch in index_batches(shards, ["key", "shard", "label"]):
        for key, shard, label in zip(*(batch.column(c).to_pylist() for c in ("key", "shard", "label")), strict=True):
            label = label or "none"
            counts[label] += 1
            # a fixed sample, the same on every render: the keys of smallest hash (a max-heap of them)
            order = int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)
            heap = chosen.setdefault(label, [])
            if len(heap) < SHOWN_PER_LABEL:
                heapq.heappush(heap, (-order, key, shard))
            elif -heap[0][0] > order:
                heapq.heapreplace(heap, (-order, key, shard))
    labels = [label for label, _ in counts.most_common(SHOWN_LABELS)]
    wanted: dict[str, set[str]] = {}
    for label in labels:
        for _, key, shard in chosen[label]:
            wanted.setdefault(shard, set()).add(key)
    samples = _payloads(shards, wanted)
    rows = []
    for label in sorted(labels):
        audio_left = [1]
        cards = [_card(key, samples[key], (member_payload(samples[key], "text") or b"").decode(errors="replace"),
                     audio_left) for _, key, _ in sorted(chosen[label], key=lambda e: e[1]) if key in samples]
        rows.append(f'<div class="strip"><h3>{html.escape(label)} ({counts[label]})</h3>{"".join(cards)}</div>')
    return f'<section id="samples"><h2>Samples per label</h2>{"".join(rows)}</section>'


def reject_examples(shards: Store) -> str:
    """Per reject code (the SHOWN_REASONS most common): its count, what it means, and
    SHOWN_REJECTS examples (key, file, line, reason; a thumbnail when the input's image is in the
    shards: duplicates)."""
    counts: Counter = Counter()
    examples: dict[str, list[dict]] = {}
    for batch in reject_batches(shards):
        for record in batch.to_pylist():
            reason = record["code"] or "(no code: written by an older tessera)"
            counts[reason] += 1
            if len(examples.setdefault(reason, [])) < SHOWN_REJECTS:
                examples[reason].append(record)
    reasons = [r for r, _ in counts.most_common(SHOWN_REASONS)]
    keys = {r["sample_key"] for reason in reasons for r in examples[reason] if r["sample_key"]}
    stored = _payloads(shards, _shards_of(shards, keys)) if keys else {}
    rows = []
    for reason in reasons:
        items = []
        for r in examples[reason]:
            image = member_payload(stored.get(r["sample_key"], {}), "image")
            thumb = _thumbnail(image) if image else None
            items.append("<li>" + (f'<img class="thumb" alt="{html.escape(str(r["key"]))}" src="{thumb}"> '
                                   if thumb else "")
                         + f"<code>{html.escape(str(r['key']))}</code> {html.escape(r['file'] or '')} line "
                         f"{r['line']}: {html.escape(r['reason'])}</li>")
        meaning = f" <small>({html.escape(CODES[reason])})</small>" if reason in CODES else ""
        rows.append(f'<div class="reason"><h3><code>{html.escape(reason)}</code>: {counts[reason]}{meaning}</h3>'
                    f'<ul>{"".join(items)}</ul></div>')
    body = "".join(rows) or "<p>no rejects</p>"
    return f'<section id="rejects"><h2>Rejects by code</h2>{body}</section>'


def _page(title: str, summary: str, plots: list[tuple[str, str]], sections: str = "") -> bytes:
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}" '
        f'onload="this.dataset.loaded=this.naturalWidth"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, data in plots)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} figure{{display:inline-block;margin:1em}}
.card{{display:inline-block;vertical-align:top;width:12em;margin:.3em;font-size:80%}}
.thumb{{max-width:{THUMB}px;max-height:{THUMB}px;vertical-align:middle}} audio{{width:11em}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{summary}</p>
{sections}
{figures}
</body></html>""".encode()


def write_run_report(run: Store) -> str:
    """RUN/report.html: a training run's loss, validation accuracy and evaluation plots; its URL."""
    summary = TrainSummary.read(run)
    text = (f"{summary.train_samples} training and {summary.val_samples} validation samples, "
            f"{summary.steps} steps, final loss {summary.final_loss:.4f}.")
    run.write_bytes(REPORT, _page("tessera training run", text, _training_plots(run) + _evaluation_plots(run)))
    return run.url_of(REPORT)


def _scaled(values: list) -> list[float]:
    """Values of one setting on [0, 1] for a parallel-coordinates axis (log for a positive range
    spanning over 10x; choices by their order)."""
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        order = sorted(set(map(str, values)))
        return [order.index(str(v)) / max(len(order) - 1, 1) for v in values]
    if min(values) > 0 and max(values) > 10 * min(values):
        values = [float(np.log(v)) for v in values]
    low, high = min(values), max(values)
    return [(v - low) / (high - low) if high > low else 0.5 for v in values]


def _tune_plots(folder: Store, rows: list[dict], metric: str) -> list[tuple[str, str]]:
    """The metric per epoch of every trial, and the settings against the metric."""
    from tessera.train.tasks import epoch_metrics
    from tessera.train.tune import trial_validation

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for row in rows:
        history = [epoch_metrics(r) for r in trial_validation(folder, json.loads(row["settings"]))]
        ax.plot([h["epoch"] for h in history if metric in h], [h[metric] for h in history if metric in h],
                marker="o", markersize=3, linewidth=1, linestyle="-" if row["status"] == "completed" else ":")
    ax.set_title(f"{metric} per epoch (dotted: stopped early)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    plots = [("Trials", _png(fig))]
    scored = [r for r in rows if r["last"] is not None]
    if scored:
        settings = [json.loads(r["settings"]) for r in scored]
        axes = sorted(settings[0])
        raw = [[s[a] for s in settings] for a in axes] + [[r["last"] for r in scored]]
        columns = [_scaled(values) for values in raw]
        fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(columns)), 3.4))
        lasts = np.array([r["last"] for r in scored])
        shade = (lasts - lasts.min()) / (np.ptp(lasts) or 1)
        for n in range(len(scored)):
            ax.plot(range(len(columns)), [c[n] for c in columns], color=plt.cm.viridis(shade[n]), linewidth=1.2)
        for x, values in enumerate(raw):  # each axis's range at its ends
            ends = [min(values), max(values)] if all(isinstance(v, int | float) for v in values) else []
            for y, v in zip((0, 1), ends, strict=True):
                ax.annotate(f"{v:.3g}", (x, y), fontsize=7, ha="center", va="top" if y == 0 else "bottom")
        ax.set_xticks(range(len(columns)), [a.removeprefix("train.") for a in axes] + [metric], rotation=20)
        ax.set_yticks([])
        ax.set_title(f"settings against {metric} (colour: {metric}, last value)")
        plots.append(("Settings and metric", _png(fig)))
    return plots


def write_tune_report(folder: Store, summary: dict, rows: list[dict]) -> str:
    """TUNE_DIR/report.html: the trials table, each trial's metric per epoch, and a parallel-
    coordinates plot of the settings against the metric; its URL."""
    metric = summary["metric"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("trial", "settings", "status", f"best {metric}",
                                                         f"last {metric}", "epochs", "seconds"))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            r["trial"], r["settings"], r["status"], "" if r["best"] is None else f"{r['best']:.4f}",
            "" if r["last"] is None else f"{r['last']:.4f}", r["epochs"], f"{r['seconds']:.1f}")) + "</tr>"
        for r in sorted(rows, key=lambda r: (r["last"] is None, r["last"] if summary["mode"] == "min" else
                                             -(r["last"] or 0))))
    table = f'<h2>Trials</h2><table class="trials" border="1" cellpadding="3"><tr>{head}</tr>{body}</table>'
    best = (f"best {metric} {summary['best_value']:.4f} ({summary['best_trial']})" if summary["best_trial"]
            else "no trial completed")
    text = (f"{summary['trials']} trials ({summary['search']} search, scheduler {summary['scheduler']}): "
            f"{summary['completed']} completed, {summary['stopped_early']} stopped early, {summary['failed']} "
            f"failed, {summary['trial_epochs']} trial-epochs; {best}.")
    folder.write_bytes(REPORT, _page("tessera hyperparameter search", html.escape(text),
                                     _tune_plots(folder, rows, metric), table))
    return folder.url_of(REPORT)


def write_report(out: Store, run: Store | None = None) -> str:
    """OUT/report.html from OUT/shards (summaries, index, sidecars) and a training run folder
    (its loss, validation accuracy and evaluation plots); its URL."""
    shards = out.child(SHARDS)
    summary = ShardSummary.read(shards)
    embed = EmbedSummary.read(shards) if EmbedSummary.exists(shards) else None
    labels, modalities = Counter(), Counter()
    for batch in index_batches(shards, ["label", "modalities"]):
        labels.update(label or "none" for label in batch.column("label").to_pylist())
        modalities.update(m for ms in batch.column("modalities").to_pylist() for m in ms)
    throughput = {"shard samples/s": summary.samples_per_s}  # of the run that wrote the shards
    throughput |= {f"embed {m}/s": v["embeddings_per_s"] for m, v in (embed.modalities if embed else {}).items()
                   if v.get("embeddings_per_s")}
    plots = [
        ("Samples per label", _bars(dict(sorted(labels.items())), "accepted samples per label")),
        ("Samples per modality", _bars(dict(modalities), "accepted samples per modality")),
        ("Rejects by code", _bars(summary.rejected_by_code or {"(none)": 0},
                                 f"rejected inputs: {summary.rejected}", horizontal=True)),
        *([("Medical images", _bars(summary.statistics["medical"], "medical images by modality and body part",
                                    horizontal=True))] if summary.statistics.get("medical") else []),
        ("Stage throughput", _bars(throughput, "throughput", horizontal=True)),
        *_embedding_plots(shards),
        *curation_plots(shards),
        *(_training_plots(run) + _evaluation_plots(run) if run else []),
    ]
    text = (f"{summary.inputs} inputs, {summary.accepted} accepted, {summary.rejected} rejected, "
            f"{summary.shards} shards; {embed.computed if embed else 0} vectors computed and "
            f"{embed.cache_hits if embed else 0} taken from the cache by the last embedding run.")
    out.write_bytes(REPORT, _page("tessera run report", text, plots, sample_strips(shards) + reject_examples(shards)))
    return out.url_of(REPORT)
