"""The multimodal model as plain single-device modules. How it is parallelized is train/parallel.py.

Inputs are packed tensors so the same modules serve data and pipeline parallelism:
  features: [B, sum(dims)] float, the modalities' cached embeddings side by side (zeros where absent)
  mask:     [B, M] float, 1 where a modality is present — fusion masks absent ones out
  pixels:   [B, 3, S, S] float (optional image branch), already normalized
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig


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


class Head(nn.Module):
    def __init__(self, hidden: int, classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class MultimodalModel(nn.Module):
    def __init__(self, dims: dict[str, int], classes: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FusionEncoder(dims, cfg)
        self.blocks = nn.Sequential(*[Block(cfg.hidden, cfg.dropout) for _ in range(cfg.blocks)])
        self.head = Head(cfg.hidden, classes)

    def layers(self) -> list[nn.Module]:
        """The same modules in order, for pipeline stages."""
        return [self.encoder, *self.blocks, self.head]

    def forward(self, inputs, labels: torch.Tensor | None = None, weights: torch.Tensor | None = None):
        """Logits; with labels, (weighted multi-task loss, logits). Weight-0 rows (padding) add nothing."""
        features, mask, *rest = inputs
        tokens, mask = self.encoder.tokens(features, mask, rest[0] if rest else None)
        logits = self.head(self.blocks(self.encoder.fuse(tokens, mask)))
        if labels is None:
            return logits
        loss = self.cfg.classification_weight * classification_loss(logits, labels, weights)
        if self.cfg.contrastive_weight:
            image, text = self.encoder.names.index("image"), self.encoder.names.index("text")
            both = (mask[:, image] * mask[:, text] * weights) > 0
            loss = loss + self.cfg.contrastive_weight * contrastive_loss(
                tokens[:, image], tokens[:, text], both, self.cfg.temperature)
        return loss, logits


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_sample * weights).sum() / weights.sum().clamp(min=1)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, both: torch.Tensor, temperature: float):
    """Symmetric InfoNCE over the samples that have both an image and a text."""
    if both.sum() < 2:
        return image.sum() * 0.0  # keeps the graph (and ZeRO's hooks) connected
    image = F.normalize(image[both].float(), dim=-1)
    text = F.normalize(text[both].float(), dim=-1)
    logits = image @ text.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
