"""The multimodal model as plain single-device modules. How it is parallelized is train/parallel.py.

Inputs are packed tensors so the same modules serve data and pipeline parallelism:
  features: [B, sum(dims)] float, the modalities' cached embeddings side by side (zeros where absent)
  mask:     [B, M] float, 1 where a modality is present — fusion masks absent ones out
  pixels:   [B, 3, S, S] float (optional image branch), already normalized
  towers:   {modality: its tower's input tensors} (last, with fine-tuned towers: train/towers.py),
            whose vectors replace that modality's cached ones; pipeline stages pass them on as
            flat tensors instead (`pipeline_inputs`), each tower's TOWER_INPUTS in turn
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tessera.features.encoders import TOKEN_INPUTS
from tessera.train.config import ModelConfig
from tessera.train.losses import TaskLoss
from tessera.train.tasks import Task

# the tensors a fine-tuned tower reads (its module's arguments: features/encoders.py), in the
# order pipeline stages pass them on (video has no tower: its frames go through image's)
TOWER_INPUTS = {"text": TOKEN_INPUTS, "image": ("pixels",), "audio": ("samples", "lengths")}


class ImageBranch(nn.Module):
    """A small CNN on the shard's pixels: one more modality token."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, hidden),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = logits.masked_fill(mask <= 0, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(weights)  # a sample with no modality at all gets zeros, not NaN


class FusionEncoder(nn.Module):
    """Per-modality projection, then masked fusion: concat, learned weighted sum or attention."""

    def __init__(self, dims: dict[str, int], cfg: ModelConfig):
        super().__init__()
        self.names = list(dims)
        self.sizes = [dims[n] for n in self.names]
        self.fusion = cfg.fusion
        self.image_branch = ImageBranch(cfg.hidden) if cfg.image_branch else None
        tokens = len(self.names) + (1 if self.image_branch else 0)
        self.project = nn.ModuleList(
            nn.Sequential(nn.Linear(d, cfg.hidden), nn.LayerNorm(cfg.hidden), nn.GELU()) for d in self.sizes)
        if cfg.fusion == "concat":
            # the mask bits are inputs too: an absent modality is visible as absent, not as zeros
            self.mix = nn.Linear(tokens * cfg.hidden + tokens, cfg.hidden)
        elif cfg.fusion == "weighted_sum":
            self.logits = nn.Parameter(torch.zeros(tokens))
        else:
            self.cls = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
            self.attend = nn.TransformerEncoderLayer(cfg.hidden, cfg.attention_heads, 2 * cfg.hidden,
                                                     dropout=cfg.dropout, batch_first=True)

    def tokens(self, features: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor | None):
        """[B, T, H] modality tokens (absent ones zeroed) and their [B, T] mask."""
        parts = torch.split(features, self.sizes, dim=1)
        tokens = [proj(x) for proj, x in zip(self.project, parts, strict=True)]
        if self.image_branch is not None:
            tokens.append(self.image_branch(pixels))
            image_present = mask[:, self.names.index("image")] if "image" in self.names else torch.ones_like(mask[:, 0])
            mask = torch.cat([mask, image_present[:, None]], dim=1)
        stacked = torch.stack(tokens, dim=1) * mask[..., None]
        return stacked, mask

    def forward(self, inputs) -> torch.Tensor:
        features, mask, *rest = inputs
        return self.fuse(*self.tokens(features, mask, rest[0] if rest else None))

    def fuse(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.fusion == "concat":
            return self.mix(torch.cat([tokens.flatten(1), mask], dim=1))
        if self.fusion == "weighted_sum":
            weights = masked_softmax(self.logits.expand_as(mask), mask)
            return (weights[..., None] * tokens).sum(1)
        cls = self.cls.expand(tokens.shape[0], -1, -1)  # not len(): export keeps the batch dynamic
        # the CLS token is always attendable, so a sample with every modality absent gets no NaN
        padding = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1) <= 0
        return self.attend(torch.cat([cls, tokens], dim=1), src_key_padding_mask=padding)[:, 0]


class Block(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Heads(nn.Module):
    """One linear head per task on the shared representation, their logits side by side; a
    regression head answers in its target's units (scaled and centred by the training split's
    statistics, so that its raw output starts near the mean)."""

    def __init__(self, hidden: int, tasks: Sequence[Task]):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.ModuleList(nn.Linear(hidden, t.outputs) for t in tasks)
        self.register_buffer("scale", torch.tensor([s for t in tasks for s in [t.scale] * t.outputs]),
                             persistent=False)
        self.register_buffer("center", torch.tensor([c for t in tasks for c in [t.center] * t.outputs]),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return torch.cat([head(x) for head in self.out], dim=1) * self.scale + self.center


class TowerLayer(nn.Module):
    """A fine-tuned tower as a pipeline layer. On the flat tuple (features, mask, [pixels],
    tower inputs...) its vectors replace its modality's cached ones in features and its input
    tensors leave the tuple; the towers after it find theirs first in what is left."""

    def __init__(self, modality: str, tower: nn.Module, encoder: FusionEncoder, packed: int):
        super().__init__()
        self.modality, self.tower, self.packed = modality, tower, packed
        self.slot, self.sizes = encoder.names.index(modality), encoder.sizes

    def forward(self, inputs: tuple) -> tuple:
        keys = TOWER_INPUTS[self.modality]
        features, *packed = inputs[: self.packed]
        mine, rest = inputs[self.packed : self.packed + len(keys)], inputs[self.packed + len(keys) :]
        parts = list(torch.split(features, self.sizes, dim=1))
        parts[self.slot] = self.tower(**dict(zip(keys, mine, strict=True))).float()
        return (torch.cat(parts, dim=1), *map(_in_graph, (*packed, *rest)))


def _in_graph(t: torch.Tensor) -> torch.Tensor:
    """T, passed on unchanged by a pipeline layer, as a tensor DeepSpeed can differentiate: it
    runs backward on every floating-point tensor a stage sends, and those of the first stage's
    batch are leaves without gradients."""
    if torch.is_grad_enabled() and t.is_floating_point() and not t.requires_grad:
        t.requires_grad_()
    return t


class MultimodalModel(nn.Module):
    """One fused representation of the modalities, residual blocks, one head per task."""

    def __init__(self, dims: dict[str, int], tasks: Sequence[Task], cfg: ModelConfig, loss: TaskLoss | None = None,
                 towers: nn.ModuleDict | None = None, align: Alignment | None = None):
        super().__init__()
        self.cfg, self.tasks = cfg, tuple(tasks)
        self.loss = loss or TaskLoss(tasks)
        self.encoder = FusionEncoder(dims, cfg)
        self.blocks = nn.Sequential(*[Block(cfg.hidden, cfg.dropout) for _ in range(cfg.blocks)])
        self.head = Heads(cfg.hidden, tasks)
        self.towers = towers
        self.alignment = align
        if align is not None:  # the contrastive objective's projections to one space, CLIP's logit scale
            self.align = nn.ModuleDict({m: nn.Linear(dims[m], align.dim) for m in align.modalities})
            # (shape [1], not a scalar: DeepSpeed broadcasts parameters as bytes)
            self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / align.temperature)]))

    def layers(self) -> list[nn.Module]:
        """The same modules in order, for pipeline stages (the towers first, the heads on the
        last one); they take `pipeline_inputs`."""
        packed = 3 if self.cfg.image_branch else 2  # features, mask[, pixels]
        towers = [TowerLayer(m, tower, self.encoder, packed) for m, tower in (self.towers or {}).items()]
        return [*towers, self.encoder, *self.blocks, self.head]

    def layer_names(self) -> list[str]:
        """What each of `layers` is, for a person."""
        return [f"{m} tower" for m in self.towers or {}] + ["fusion"] + ["block"] * len(self.blocks) + ["heads"]

    def pipeline_inputs(self, inputs: tuple) -> tuple:
        """INPUTS as the flat tensor tuple `layers` pass on: the towers' input tensors last,
        tower by tower in the layers' order."""
        if self.towers is None:
            return inputs
        *packed, towers = inputs
        return (*packed, *(towers[m][k] for m in self.towers for k in TOWER_INPUTS[m]))

    def _vectors(self, features: torch.Tensor, towers: dict) -> torch.Tensor:
        """The packed features with each fine-tuned modality's vectors made by its tower (a
        video's: the mean of its frames' through the image tower, as the cache makes them)."""
        vectors = {m: self.towers[m](**inputs) for m, inputs in towers.items() if m not in ("image", "video")}
        if "video" in towers:  # one pass of the image tower over the images and the frames
            pixels, video = towers["image"]["pixels"], towers["video"]
            both = self.towers["image"](torch.cat([pixels, video["frames"].to(pixels.dtype)]))
            vectors["image"], vectors["video"] = both[: len(pixels)], clip_means(both[len(pixels) :], video["counts"])
        elif "image" in towers:
            vectors["image"] = self.towers["image"](**towers["image"])
        parts = list(torch.split(features, self.encoder.sizes, dim=1))
        for modality, made in vectors.items():
            parts[self.encoder.names.index(modality)] = made.float()
        return torch.cat(parts, dim=1)

    def aligned(self, features: torch.Tensor, modality: str) -> torch.Tensor:
        """A modality's vectors in the contrastive objective's shared space (unnormalized)."""
        j = self.encoder.names.index(modality)
        start = sum(self.encoder.sizes[:j])
        return self.align[modality](features[:, start : start + self.encoder.sizes[j]])

    def forward(self, inputs, targets: tuple | None = None):
        """The tasks' logits; with targets (values, present, weights[, teacher logits]): (loss,
        per-task losses, per-task sample counts, logits). Weight-0 rows (padding) add nothing."""
        features, mask, *rest = inputs
        if self.towers is not None:
            features = self._vectors(features, rest.pop())
        tokens, mask = self.encoder.tokens(features, mask, rest[0] if rest else None)
        logits = self.head(self.blocks(self.encoder.fuse(tokens, mask)))
        if targets is None:
            return logits
        loss, per_task, counts = self.loss(logits, targets)
        weights = targets[2]
        if self.cfg.contrastive_weight:
            image, text = self.encoder.names.index("image"), self.encoder.names.index("text")
            both = (mask[:, image] * mask[:, text] * weights) > 0
            loss = loss + self.cfg.contrastive_weight * contrastive_loss(
                tokens[:, image], tokens[:, text], both, 1 / self.cfg.temperature)
        if self.alignment is not None:
            scale = self.logit_scale.exp().clamp(max=100)
            aligned = sum(contrastive_loss(self.aligned(features, a), self.aligned(features, b),
                                           mask[:, self.encoder.names.index(a)] * mask[:, self.encoder.names.index(b)]
                                           * weights > 0, scale)
                          for a, b in self.alignment.pairs) / len(self.alignment.pairs)
            loss = self.alignment.supervised_weight * loss + aligned
        return loss, per_task, counts, logits


class Alignment:
    """The contrastive objective's settings a model is built with (train.contrastive, its pairs
    present in the model)."""

    def __init__(self, pairs: Sequence[Sequence[str]], dim: int, temperature: float, supervised_weight: float):
        self.pairs = tuple(tuple(p) for p in pairs)
        self.dim, self.temperature, self.supervised_weight = dim, temperature, supervised_weight

    @property
    def modalities(self) -> list[str]:
        return list(dict.fromkeys(m for pair in self.pairs for m in pair))

    def meta(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "dim": self.dim, "temperature": self.temperature,
                "supervised_weight": self.supervised_weight}


def clip_means(frame_vectors: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[clips, D]: the mean of each clip's frames' vectors (FRAME_VECTORS: the clips' frames in
    order, COUNTS of each; a clip without frames: zeros)."""
    clip_of_frame = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    sums = frame_vectors.new_zeros(len(counts), frame_vectors.shape[1]).index_add(0, clip_of_frame, frame_vectors)
    return sums / counts.clamp(min=1)[:, None].to(sums.dtype)


def gathered(x: torch.Tensor) -> torch.Tensor:
    """X from every rank, concatenated in rank order; this rank's part keeps its gradient (the
    others' arrive as constants: each rank's loss then differentiates its own samples)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, both: torch.Tensor, scale: torch.Tensor | float):
    """Symmetric InfoNCE (CLIP's) over the samples that have both A and B, every rank's batch
    gathered: each sample's pair is its positive, every other gathered sample a negative.
    SCALE multiplies the cosine similarities (1 / temperature)."""
    a, b = gathered(F.normalize(a.float(), dim=-1)), gathered(F.normalize(b.float(), dim=-1))
    both = gathered(both.float()) > 0
    if both.sum() < 2:
        return a.sum() * 0.0 + b.sum() * 0.0  # keeps the graph (and ZeRO's hooks) connected
    logits = scale * a[both] @ b[both].T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
