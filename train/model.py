"""The multimodal model as plain single-device modules. How it is parallelized is train/parallel.py.

Inputs are packed tensors so the same modules serve data and pipeline parallelism:
  features: [B, sum(dims)] float, the modalities' cached embeddings side by side (zeros where absent)
  mask:     [B, M] float, 1 where a modality is present — fusion masks absent ones out
  pixels:   [B, 3, S, S] float (optional image branch), already normalized
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tessera.train.config import ModelConfig
from tessera.train.losses import TaskLoss
from tessera.train.tasks import Task


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


class MultimodalModel(nn.Module):
    """One fused representation of the modalities, residual blocks, one head per task."""

    def __init__(self, dims: dict[str, int], tasks: Sequence[Task], cfg: ModelConfig, loss: TaskLoss | None = None):
        super().__init__()
        self.cfg, self.tasks = cfg, tuple(tasks)
        self.loss = loss or TaskLoss(tasks)
        self.encoder = FusionEncoder(dims, cfg)
        self.blocks = nn.Sequential(*[Block(cfg.hidden, cfg.dropout) for _ in range(cfg.blocks)])
        self.head = Heads(cfg.hidden, tasks)

    def layers(self) -> list[nn.Module]:
        """The same modules in order, for pipeline stages (the heads on the last one)."""
        return [self.encoder, *self.blocks, self.head]

    def forward(self, inputs, targets: tuple | None = None):
        """The tasks' logits; with targets (values, present, weights[, teacher logits]): (loss,
        per-task losses, per-task sample counts, logits). Weight-0 rows (padding) add nothing."""
        features, mask, *rest = inputs
        tokens, mask = self.encoder.tokens(features, mask, rest[0] if rest else None)
        logits = self.head(self.blocks(self.encoder.fuse(tokens, mask)))
        if targets is None:
            return logits
        loss, per_task, counts = self.loss(logits, targets)
        if self.cfg.contrastive_weight:
            weights = targets[2]
            image, text = self.encoder.names.index("image"), self.encoder.names.index("text")
            both = (mask[:, image] * mask[:, text] * weights) > 0
            loss = loss + self.cfg.contrastive_weight * contrastive_loss(
                tokens[:, image], tokens[:, text], both, self.cfg.temperature)
        return loss, per_task, counts, logits


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, both: torch.Tensor, temperature: float):
    """Symmetric InfoNCE over the samples that have both an image and a text."""
    if both.sum() < 2:
        return image.sum() * 0.0  # keeps the graph (and ZeRO's hooks) connected
    image = F.normalize(image[both].float(), dim=-1)
    text = F.normalize(text[both].float(), dim=-1)
    logits = image @ text.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
