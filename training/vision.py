"""Vision-tower stage: supervised multi-task pre-training of a randomly initialised vision tower.

The ``tiny`` preset starts its vision tower from random weights (no download). Before the projector and the
language model learn to read image tokens, the tower is trained on the image-level labels of the training
records (:data:`training.tasks.TASKS`, masked cross-entropy per task, unknown labels ignored) through linear
heads on the mean of exactly the feature tokens LLaVA passes to its projector (``vision_feature_layer`` and
``vision_feature_select_strategy``). The heads are discarded afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.records import Record
from training.tasks import TASKS, Task


@dataclass(frozen=True)
class FeatureSelection:
    """Which hidden state LLaVA feeds the projector, and whether the CLS token is dropped ("default")."""

    layer: int = -2
    strategy: str = "default"


def select_features(tower: nn.Module, pixel_values: torch.Tensor, selection: FeatureSelection) -> torch.Tensor:
    """The image tokens LLaVA gives its projector (``B×N×D``)."""
    outputs = tower(pixel_values=pixel_values, output_hidden_states=True)
    features = outputs.hidden_states[selection.layer]
    return features[:, 1:] if selection.strategy == "default" else features


class MultiTaskProbe(nn.Module):
    """A vision tower with one linear head per task on the mean-pooled selected features."""

    def __init__(self, tower: nn.Module, width: int, tasks: Sequence[Task], selection: FeatureSelection):
        super().__init__()
        self.tower = tower
        self.selection = selection
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({t.name: nn.Linear(width, t.classes) for t in tasks})

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.norm(select_features(self.tower, pixel_values, self.selection).mean(dim=1))
        return {name: head(pooled) for name, head in self.heads.items()}


def label_matrix(records: Sequence[Record], tasks: Sequence[Task] = TASKS) -> np.ndarray:
    """``N×T`` integer labels, −1 where unknown."""
    out = np.full((len(records), len(tasks)), -1, dtype=np.int64)
    for i, record in enumerate(records):
        for j, task in enumerate(tasks):
            value = task.label(record)
            if value is not None:
                out[i, j] = value
    return out


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips, 90° rotations and brightness/contrast jitter (``B×3×H×W`` in 0–1)."""
    n = batch.shape[0]
    flip_h = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip_h[:, None, None, None], batch.flip(-1), batch)
    flip_v = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip_v[:, None, None, None], batch.flip(-2), batch)
    brightness = 1.0 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.4
    contrast = 1.0 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.4
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    return ((batch - mean) * contrast + mean * brightness).clamp(0.0, 1.0)


def to_pixel_values(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8`` ``N×H×W×3`` to normalised ``float32`` ``N×3×H×W``."""
    tensor = torch.from_numpy(np.array(pixels, copy=True)).permute(0, 3, 1, 2).float() / 255.0
    return normalise(tensor, mean, std)


def normalise(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=tensor.dtype)[None, :, None, None]
    s = torch.tensor(std, dtype=tensor.dtype)[None, :, None, None]
    return (tensor - m) / s


@dataclass(frozen=True)
class VisionStageOptions:
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    seed: int = 0


def balanced_task_weights(labels: np.ndarray) -> torch.Tensor:
    """Weight of each task's loss: 1/sqrt(labelled fraction) so sparse tasks are not drowned out."""
    fraction = (labels >= 0).mean(axis=0).clip(1e-3, None)
    return torch.tensor(1.0 / np.sqrt(fraction), dtype=torch.float32)


def train_vision_tower(probe: MultiTaskProbe, pixels: np.ndarray, labels: np.ndarray, mean: Sequence[float],
                       std: Sequence[float], options: VisionStageOptions,
                       on_step: Callable[[int, int, float], None] | None = None,
                       device: torch.device | str = "cpu") -> list[float]:
    """Train ``probe`` in place on ``pixels`` (uint8 N×H×W×3) and ``labels`` (N×T, −1 unknown); returns the
    loss of every step. ``on_step(step, total, loss)`` reports progress. Batches are augmented on the CPU and
    moved to ``device`` (bf16 autocast on CUDA)."""
    generator = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)
    n = len(pixels)
    steps_per_epoch = math.ceil(n / options.batch_size)
    total = steps_per_epoch * options.epochs
    optimizer = torch.optim.AdamW(probe.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    warmup = max(1, int(total * options.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    probe.to(device)
    weights = balanced_task_weights(labels).to(device)
    target = torch.from_numpy(labels).to(device)
    cuda = torch.device(device).type == "cuda"
    names = list(probe.heads.keys())
    losses: list[float] = []
    probe.train()
    step = 0
    for _ in range(options.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, options.batch_size):
            index = order[start:start + options.batch_size].numpy()
            index.sort()
            batch = torch.from_numpy(np.ascontiguousarray(pixels[index])).permute(0, 3, 1, 2).float() / 255.0
            batch = normalise(augment(batch, generator), mean, std).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = probe(batch)
            logits = {name: value.float() for name, value in logits.items()}
            y = target[torch.from_numpy(index).to(device)]
            loss = torch.zeros((), device=device)
            for j, name in enumerate(names):
                known = y[:, j] >= 0
                if known.any():
                    loss = loss + weights[j] * nn.functional.cross_entropy(logits[name][known], y[known, j])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
            if on_step is not None:
                on_step(step, total, float(loss.detach()))
    probe.eval()
    return losses


@torch.no_grad()
def predict(probe: MultiTaskProbe, pixels: np.ndarray, mean: Sequence[float], std: Sequence[float],
            batch_size: int = 64) -> dict[str, np.ndarray]:
    """Softmax probabilities per task (``N×classes``)."""
    probe.eval()
    device = next(probe.parameters()).device
    out: dict[str, list[np.ndarray]] = {name: [] for name in probe.heads}
    for start in range(0, len(pixels), batch_size):
        logits = probe(to_pixel_values(pixels[start:start + batch_size], mean, std).to(device))
        for name, value in logits.items():
            out[name].append(value.float().softmax(-1).cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}
