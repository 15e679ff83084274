"""Typed settings of the training stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tessera.core.config import Strict
from tessera.preprocess.config import Modality


class ModelConfig(Strict):
    modalities: tuple[Modality, ...] = ("text", "image", "audio", "video")
    hidden: int = Field(128, gt=0)
    fusion: Literal["concat", "weighted_sum", "attention"] = "concat"
    attention_heads: int = Field(4, gt=0)
    blocks: int = Field(2, ge=1, description="residual MLP blocks after fusion")
    dropout: float = Field(0.1, ge=0, lt=1)
    # a small trainable CNN on the shard's pixels, normalized with the shard statistics
    image_branch: bool = False
    image_branch_size: int = Field(64, gt=0)
    contrastive_weight: float = Field(0.0, ge=0, description="image-text InfoNCE loss weight")
    temperature: float = Field(0.07, gt=0)


class TaskConfig(Strict):
    """One head of the model. Its kind and label set are the field's own: `label` is a
    classification over shard.labels (or the labels found), any other field is declared in
    shard.targets, where its values are checked before training ever sees them."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    field: str | None = Field(None, description="manifest field (default: the task's name)")
    weight: float = Field(1.0, ge=0, description="its share of the total loss")

    @property
    def source(self) -> str:
        return self.field or self.name


class DistillConfig(Strict):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the teacher's soft targets; 1 - alpha: the "
                         "hard labels")
    temperature: float = Field(2.0, gt=0)


class ContrastiveConfig(Strict):
    """`objective: contrastive`: CLIP's symmetric InfoNCE between each pair's vectors (projected
    to a shared space, a learnable temperature), negatives from every rank's batch."""

    pairs: tuple[tuple[Modality, Modality], ...] = (("image", "text"), ("audio", "text"))
    dim: int = Field(128, gt=0, description="width of the shared space")
    temperature: float = Field(0.07, gt=0, description="initial; learned (CLIP's logit scale, capped at 100)")
    supervised_weight: float = Field(0.0, ge=0, description="weight of the task heads' loss beside it (0: none)")


Tower = Literal["text", "image", "audio", "video"]


class CrossValidationConfig(Strict):
    """k trainings, each validating on its own k-th of the keys (by key hash: a key's fold never
    changes between runs), the run's validation figures their mean (train/crossval.py)."""

    folds: int | None = Field(None, ge=2, description="null: one training on val_fraction")
    fold: int | None = Field(None, ge=0, description="set on each fold's own run (RUN/folds/<fold>): the fold "
                             "it validates on")

    @model_validator(mode="after")
    def _fold_of_folds(self) -> CrossValidationConfig:
        if self.fold is not None and (self.folds is None or self.fold >= self.folds):
            raise ValueError(f"fold {self.fold} needs folds above it (got folds: {self.folds})")
        return self


class TrainConfig(Strict):
    model: ModelConfig = ModelConfig()
    # The modalities whose encoder towers are trained end to end, from the shards' members
    # (tokens, pixels) rather than from the cached vectors; the others stay frozen.
    finetune: tuple[Tower, ...] = ()
    unfreeze_last: int | None = Field(None, gt=0, description="train only each tower's last N blocks (and what "
                                      "follows them); null: all")
    encoder_lr: float = Field(2e-5, gt=0, description="the towers' learning rate (the heads': lr)")
    activation_checkpointing: bool = Field(False, description="recompute the towers' activations in backward")
    objective: Literal["supervised", "contrastive"] = "supervised"
    contrastive: ContrastiveConfig = ContrastiveConfig()
    offload: Literal["none", "optimizer", "all"] = Field("none", description="ZeRO-Offload to CPU memory: the "
                                                         "optimizer state (ZeRO >= 1), or also the parameters (ZeRO-3)")
    # the model's heads; none: one classification task named `label` from the label field
    tasks: tuple[TaskConfig, ...] = ()
    workers: int = Field(2, gt=0, description="Ray Train workers (processes)")
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    parallel: Literal["data", "pipeline"] = "data"
    pipeline_stages: int = Field(2, ge=2)
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it
    epochs: int = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    micro_batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10, ge=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    val_fraction: float = Field(0.2, ge=0, lt=1, description="share of keys (by hash) held out")
    cross_validation: CrossValidationConfig = CrossValidationConfig()
    shuffle_buffer: int = Field(64, ge=1)
    loader_workers: int = Field(2, ge=0)
    checkpoint_every: int = Field(50, gt=0, description="optimizer steps between checkpoints")
    # Any fsspec URL (s3://...) for the checkpoints, `latest` written last; null: RUN/checkpoints.
    # DeepSpeed loads checkpoints with pickle: this store must be trusted like code.
    checkpoint_url: str | None = None
    keep_checkpoints: int = Field(3, gt=0)
    max_failures: int = Field(3, ge=0, description="times a failed worker group (a lost node) is restarted "
                              "from the latest checkpoint")
    # A trained run folder (any fsspec URL) with model.safetensors + model.json: training starts
    # from those weights with a fresh optimizer and schedule. A checkpoint in the run's own
    # folder takes precedence, so an interrupted run resumes where it stopped.
    init_from: str | None = None
    # A trained run (the teacher): this run trains a student (its own `model` settings) on
    # the teacher's outputs, computed on the fly from the same batches by the frozen teacher
    # on every rank, and the hard targets (train/losses.py: TaskLoss).
    distill_from: str | None = None
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _compatible(self) -> TrainConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: each name once, got {names}")
        if self.init_from and self.distill_from:
            raise ValueError("init_from and distill_from exclude each other: a student starts from its own weights")
        if self.parallel == "pipeline":
            if self.workers % self.pipeline_stages:
                raise ValueError(f"workers ({self.workers}) must be a multiple of pipeline_stages "
                                 f"({self.pipeline_stages})")
            if self.zero_stage > 1:
                raise ValueError("pipeline parallelism works with zero_stage 0 or 1 (DeepSpeed's limit)")
            if self.model.contrastive_weight:
                raise ValueError("the contrastive loss needs the whole batch on one stage: use parallel: data")
            if self.finetune and self.zero_stage:
                # ZeRO reduces the gradient norm over the stages once per parameter group, and a
                # stage holding only a tower has one group where the heads' stage has two
                raise ValueError("pipeline stages over fine-tuned towers train with zero_stage 0 (DeepSpeed's "
                                 "ZeRO needs the same parameter groups on every stage)")
        if self.model.contrastive_weight and not {"image", "text"} <= set(self.model.modalities):
            raise ValueError("the contrastive loss needs both image and text in model.modalities")
        if not set(self.finetune) <= set(self.model.modalities):
            raise ValueError(f"finetune {list(self.finetune)}: each must be one of model.modalities "
                             f"{list(self.model.modalities)}")
        if "video" in self.finetune and ("image" not in self.finetune or self.parallel == "pipeline"):
            raise ValueError("finetune: video's frames go through the image tower: fine-tune image too, with "
                             "parallel: data")
        if self.offload == "optimizer" and self.zero_stage == 0 or self.offload == "all" and self.zero_stage != 3:
            raise ValueError(f"offload: {self.offload} needs zero_stage {'3' if self.offload == 'all' else '>= 1'}")
        if self.objective == "contrastive":
            if self.parallel == "pipeline":
                raise ValueError("the contrastive objective needs the whole batch on one stage: use parallel: data")
            if not self.contrastive_pairs:
                raise ValueError(f"objective contrastive: none of contrastive.pairs {self.contrastive.pairs} has "
                                 f"both modalities in model.modalities {list(self.model.modalities)}")
        return self

    @property
    def val_split(self) -> float | tuple[float, float]:
        """Which keys validate (train/data.py: ValSplit): val_fraction's share, or a fold's window."""
        cv = self.cross_validation
        if cv.fold is not None:
            return (cv.fold / cv.folds, (cv.fold + 1) / cv.folds)
        return self.val_fraction

    @property
    def contrastive_pairs(self) -> tuple[tuple[str, str], ...]:
        """The pairs the contrastive objective aligns (both modalities in the model)."""
        if self.objective != "contrastive":
            return ()
        return tuple(p for p in self.contrastive.pairs if set(p) <= set(self.model.modalities))


class ExportConfig(Strict):
    """`tessera export`: which compressed variants to write beside the fp32 model."""

    int8: bool = True  # dynamic int8 quantization of the linear layers (onnxruntime)
    prune_sparsity: float | None = Field(None, gt=0, lt=1, description="magnitude-prune this share of "
                                         "the linear weights (global L1); null: no pruned variant")
    accuracy_tolerance: float = Field(0.05, ge=0, le=1, description="a variant's validation accuracy may be "
                                      "this much below fp32's and still pass")
    batch_size: int = Field(256, gt=0)
    bundle: bool = Field(False, description="also the encoders as ONNX (fp32, and int8 with int8): an all-ONNX "
                         "bundle that `tessera predict --bundle` / `serve --bundle` run without torch")
    bundle_samples: int = Field(128, gt=0, description="validation samples the bundle is compared with torch on")


class TrackingConfig(Strict):
    """Experiment records in MLflow (train/tracking.py)."""

    mlflow_uri: str | None = Field(None, description="an MLflow tracking URI: a local store (file:/path, no "
                                   "server needed) or a server (http://host:5000); null: off")
    experiment: str = Field("tessera", min_length=1)


NO_TRACKING = TrackingConfig()


SpaceValue = bool | int | float | str | None


class Distribution(Strict):
    """One entry of tune.space: exactly one of its fields, e.g. `{loguniform: [1e-4, 1e-2]}`."""

    choice: tuple[SpaceValue, ...] | None = Field(None, min_length=1)
    grid: tuple[SpaceValue, ...] | None = Field(None, min_length=1, description="every value, once each")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="[low, high): high excluded")

    @model_validator(mode="after")
    def _one_valid_range(self) -> Distribution:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)} (got {given or 'none'})")
        low, high = (self.uniform or self.loguniform or self.randint or (0, 1))
        if not low < high:
            raise ValueError(f"{given[0]}: [low, high] needs low < high (got [{low}, {high}])")
        if self.loguniform and low <= 0:
            raise ValueError(f"loguniform: both ends must be above 0 (got [{low}, {high}])")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    def extremes(self) -> tuple[SpaceValue, ...]:
        """Values a trial may be given that are checked against the config up front: every
        listed value, the ends of a range."""
        if self.choice or self.grid:
            return self.choice or self.grid
        if self.randint:
            return (self.randint[0], self.randint[1] - 1)
        return self.uniform or self.loguniform


class TrialResources(Strict):
    """What each trial trains with (its train.workers and cpus_per_worker; GPUs as train.use_gpu
    says): trials pack onto the cluster by it."""

    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1, gt=0)


METRIC_NAME = r"^val\.(loss|accuracy|[A-Za-z_][A-Za-z0-9_]*\.[a-z_0-9]+)$"


class TuneConfig(Strict):
    """`tessera tune`: a search over `train` settings, each trial a training run."""

    space: dict[str, Distribution] = Field(default_factory=dict, description="dotted config keys (train.lr, "
                                           "train.model.dropout) to distributions")
    search: Literal["grid", "random", "bayes"] = Field("random", description="bayes: Optuna's TPE")
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop trials early on the metric "
                                               "reported each epoch")
    trials: int = Field(8, gt=0, description="trials drawn (random, bayes); a grid runs each of its points once")
    max_concurrent: int = Field(2, gt=0)
    metric: str = Field("val.loss", pattern=METRIC_NAME, description="val.loss, val.accuracy or "
                        "val.<task>.<metric> of the validation records (metrics.jsonl)")
    mode: Literal["min", "max"] = "min"
    grace_epochs: int = Field(1, gt=0, description="epochs every trial runs before ASHA may stop it")
    resources_per_trial: TrialResources = TrialResources()

    @model_validator(mode="after")
    def _search_fits_space(self) -> TuneConfig:
        grid = [k for k, d in self.space.items() if d.kind == "grid"]
        if self.search == "grid" and len(grid) != len(self.space):
            raise ValueError(f"search: grid needs every space entry to be a grid (not: "
                             f"{', '.join(k for k in self.space if k not in grid)})")
        if self.search != "grid" and grid:
            raise ValueError(f"{', '.join(grid)}: a grid entry needs search: grid")
        for key in self.space:
            if not key.startswith("train."):
                raise ValueError(f"space key {key!r}: a trial varies train settings (train.lr, train.model.dropout)")
        return self


def with_settings(cfg: TrainConfig, settings: dict[str, SpaceValue]) -> TrainConfig:
    """CFG with SETTINGS applied (dotted keys under train: `lr`, `model.dropout`), validated; a
    key that is not a setting is a ValueError naming it."""
    tree = cfg.model_dump(mode="json")
    for dotted, value in settings.items():
        *sections, leaf = dotted.split(".")
        node = tree
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ValueError(f"train.{dotted} is not a training setting")
        node[leaf] = value
    return TrainConfig.model_validate(tree)
