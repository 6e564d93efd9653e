"""Tower stage for a pretrained CNN tower (EfficientNet-Lite): fine-tune it on the labelled train images.

The tower starts from ImageNet weights (:func:`model.vision.efficientnet_lite.load_imagenet_state_dict`). Its first
``freeze_blocks`` MBConv blocks (the high-resolution, generic edge/texture stages) stay frozen; the later blocks and
the head are fine-tuned with one linear head per image-level task (:data:`training.tasks.TASKS`, masked
cross-entropy: a label a dataset does not give contributes nothing). Because the frozen part never changes, its
output is computed once for ``views`` augmented copies of every image and kept in memory (fp16); every epoch then
trains the tail on one of each image's views. On two CPU cores this makes fine-tuning at a lesion-revealing
resolution (384 px) about four times cheaper than running the whole network every step.

Augmentation (:func:`camera_augment`) imitates what differs between fundus cameras and sessions: rotation,
scale and shift of the field of view, mirror (left/right eye), brightness, contrast, saturation, white balance,
gamma, defocus blur and loss of resolution.

The best epoch is chosen on the validation split (carved from train, never from test) by the mean of the tasks'
validation AUCs; its weights are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.vision.efficientnet_lite import EfficientNetLiteVisionModel
from training.metrics import roc_auc
from training.tasks import TASKS, Task
from training.vision import balanced_task_weights

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
"""EfficientNet-Lite's input normalisation (TensorFlow ``(x − 127.5) / 127.5``)."""


@dataclass(frozen=True)
class TowerStageOptions:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    head_learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    freeze_blocks: int = 10
    views: int = 6
    label_smoothing: float = 0.05
    seed: int = 0


def camera_augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random camera-like changes of ``B×3×H×W`` images in 0–1 (see module docstring)."""
    n, _, h, w = batch.shape

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    angle = uniform(-math.pi / 9, math.pi / 9)
    scale = uniform(0.9, 1.12)
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift = uniform(-0.04, 0.04, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lowres = torch.rand(n, generator=generator) < 0.3
    if bool(lowres.any()):
        factor = float(uniform(0.35, 0.8)[0])
        small = F.interpolate(out[lowres], scale_factor=factor, mode="bilinear", antialias=True, align_corners=False)
        out[lowres] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    blurred = torch.rand(n, generator=generator) < 0.25
    if bool(blurred.any()):
        sigma = float(uniform(0.6, 1.8)[0])
        radius = int(math.ceil(2.5 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=out.dtype)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        across = kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        down = kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1)
        part = F.conv2d(F.pad(out[blurred], (radius, radius, 0, 0), mode="replicate"), across, groups=3)
        out[blurred] = F.conv2d(F.pad(part, (0, 0, radius, radius), mode="replicate"), down, groups=3)
    grey = out.mean(dim=1, keepdim=True)
    saturation = uniform(0.75, 1.25, 1, 1, 1)
    out = grey + (out - grey) * saturation
    out = out * uniform(0.9, 1.1, 3, 1, 1) * uniform(0.75, 1.25, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * uniform(0.75, 1.3, 1, 1, 1) + mean
    out = out.clamp(0.0, 1.0) ** uniform(0.8, 1.25, 1, 1, 1)
    return out.clamp(0.0, 1.0)


def to_input(pixels: np.ndarray) -> torch.Tensor:
    """``uint8`` ``N×H×W×3`` → ``float32`` ``N×3×H×W`` in 0–1."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0


def normalise(batch: torch.Tensor) -> torch.Tensor:
    return (batch - MEAN[0]) / STD[0]


class TowerParts:
    """The frozen front and the trainable tail of an EfficientNet-Lite tower."""

    def __init__(self, tower: EfficientNetLiteVisionModel, freeze_blocks: int) -> None:
        backbone = tower.backbone
        if not 0 <= freeze_blocks <= len(backbone.blocks):
            raise ValueError(f"freeze_blocks {freeze_blocks} outside 0..{len(backbone.blocks)}")
        self.tower = tower
        self.front = nn.Sequential(backbone.stem, *backbone.blocks[:freeze_blocks])
        self.tail = nn.Sequential(*backbone.blocks[freeze_blocks:], backbone.head)

    @torch.no_grad()
    def front_features(self, images: torch.Tensor) -> torch.Tensor:
        self.front.eval()
        return self.front(normalise(images).contiguous(memory_format=torch.channels_last))

    def tokens(self, front: torch.Tensor) -> torch.Tensor:
        return self.tower.tokens(self.tail(front.float().contiguous(memory_format=torch.channels_last)))


class TaskHeads(nn.Module):
    """One linear head per task on the normalised global token."""

    def __init__(self, width: int, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({t.name: nn.Linear(width, t.classes) for t in tasks})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.norm(tokens[:, 0])
        return {name: head(pooled) for name, head in self.heads.items()}


def precompute_views(parts: TowerParts, pixels: np.ndarray, views: int, seed: int, batch_size: int = 32,
                     on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """The frozen front's output for ``views`` augmented copies of every image (view 0 unaugmented):
    ``views × N × C × h × w`` fp16."""
    generator = torch.Generator().manual_seed(seed)
    out: torch.Tensor | None = None
    for view in range(views):
        for start in range(0, len(pixels), batch_size):
            batch = to_input(pixels[start:start + batch_size])
            if view:
                batch = camera_augment(batch, generator)
            features = parts.front_features(batch).to(torch.float16)
            if out is None:
                out = torch.empty((views, len(pixels), *features.shape[1:]), dtype=torch.float16)
            out[view, start:start + len(batch)] = features
            if on_batch is not None:
                on_batch(len(batch))
    assert out is not None
    return out


def masked_task_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor, weights: torch.Tensor,
                     tasks: Sequence[Task], smoothing: float) -> torch.Tensor:
    """Σ over tasks of weight × cross-entropy over the images that label the task (−1 = unknown: ignored)."""
    loss = torch.zeros(())
    for j, task in enumerate(tasks):
        known = labels[:, j] >= 0
        if known.any():
            loss = loss + weights[j] * F.cross_entropy(logits[task.name][known], labels[known, j],
                                                        label_smoothing=smoothing)
    return loss


@torch.no_grad()
def task_probabilities(parts: TowerParts, heads: TaskHeads, front: torch.Tensor,
                       batch_size: int = 64) -> dict[str, np.ndarray]:
    parts.tail.eval()
    heads.eval()
    out: dict[str, list[np.ndarray]] = {name: [] for name in heads.heads}
    for start in range(0, len(front), batch_size):
        logits = heads(parts.tokens(front[start:start + batch_size]))
        for name, value in logits.items():
            out[name].append(value.softmax(-1).numpy())
    return {name: np.concatenate(parts_) for name, parts_ in out.items()}


def validation_aucs(probabilities: dict[str, np.ndarray], labels: np.ndarray,
                    tasks: Sequence[Task] = TASKS) -> dict[str, float]:
    """AUC of every binary task the validation labels contain both classes of."""
    out = {}
    for j, task in enumerate(tasks):
        if task.classes != 2:
            continue
        known = labels[:, j] >= 0
        if len(set(labels[known, j].tolist())) == 2:
            out[task.name] = roc_auc(labels[known, j], probabilities[task.name][known, 1])
    return out


def fine_tune_tower(tower: EfficientNetLiteVisionModel, pixels: np.ndarray, labels: np.ndarray,
                    val_pixels: np.ndarray, val_labels: np.ndarray, options: TowerStageOptions,
                    on_step: Callable[[int, int, float], None] | None = None,
                    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                    tasks: Sequence[Task] = TASKS) -> tuple[list[float], list[dict[str, float]], TowerViews]:
    """Fine-tune ``tower`` in place (see module docstring); returns the step losses, each epoch's validation
    AUCs, and the frozen front's views of the train and validation images (to compute image tokens from). The
    tower ends with the weights of the best validation epoch."""
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    parts = TowerParts(tower, options.freeze_blocks)
    for parameter in parts.front.parameters():
        parameter.requires_grad_(False)
    tower.to(memory_format=torch.channels_last)
    front = precompute_views(parts, pixels, options.views, options.seed)
    val_front = precompute_views(parts, val_pixels, 1, options.seed)[0]
    heads = TaskHeads(tower.config.hidden_size, tasks)
    optimizer = torch.optim.AdamW([
        {"params": list(parts.tail.parameters()), "lr": options.learning_rate},
        {"params": list(heads.parameters()), "lr": options.head_learning_rate},
    ], weight_decay=options.weight_decay)
    n = len(pixels)
    total = math.ceil(n / options.batch_size) * options.epochs
    warmup = max(1, int(total * options.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    weights = balanced_task_weights(labels)
    target = torch.from_numpy(labels)
    losses: list[float] = []
    history: list[dict[str, float]] = []
    best_score, best_state = -1.0, None
    step = 0
    for epoch in range(options.epochs):
        parts.tail.train()
        parts.front.eval()
        heads.train()
        order = torch.randperm(n, generator=generator)
        view = torch.randint(0, options.views, (n,), generator=generator)
        for start in range(0, n, options.batch_size):
            index = order[start:start + options.batch_size]
            batch = front[view[index], index]
            loss = masked_task_loss(heads(parts.tokens(batch)), target[index], weights, tasks,
                                    options.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 2.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, total, losses[-1])
        aucs = validation_aucs(task_probabilities(parts, heads, val_front), val_labels, tasks)
        history.append(aucs)
        if on_epoch is not None:
            on_epoch(epoch + 1, aucs)
        score = float(np.mean(list(aucs.values()))) if aucs else float(epoch)
        if score > best_score:
            best_score = score
            best_state = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    if best_state is not None:
        tower.load_state_dict(best_state)
    tower.to(memory_format=torch.contiguous_format)
    tower.eval()
    return losses, history, TowerViews(parts, front, val_front)


@dataclass
class TowerViews:
    """The frozen front's output for the augmented train views and the validation images."""

    parts: TowerParts
    train: torch.Tensor
    validation: torch.Tensor

    @torch.no_grad()
    def tokens(self, front: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Image tokens (``N×(1+g²)×C`` fp16) of front outputs ``N×…``."""
        self.parts.tail.eval()
        parts = [self.parts.tokens(front[s:s + batch_size]).to(torch.float16) for s in range(0, len(front), batch_size)]
        return torch.cat(parts)
