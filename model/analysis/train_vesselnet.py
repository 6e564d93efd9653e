"""Train the vessel U-Net on DRIVE's 20 training images (CPU) and write its weights and figures.

    nice -n 10 .venv/bin/python -m model.analysis.train_vesselnet --drive ../shared/data/fundus/DRIVE \
        --minutes 40 --threads 1

Recipe: each training image is rendered in several photometric and scale variants (gamma, contrast, blur, red
leaking into green, noise, scale 0.8–1.25 — other cameras differ in exactly these), normalised as at inference
(:func:`model.analysis.vessels.normalised_green`), then random 80 × 80 patches with flips and quarter turns
train the network with binary cross-entropy + soft Dice inside the FOV, Adam with a cosine learning rate over a
wall-clock budget. The operating threshold is the one that maximises Dice on the training images. Only then are
the DRIVE test images scored (1st observer, inside the FOV): the figures go to ``vesselnet_training/``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from scipy import ndimage as ndi
from skimage.transform import resize

from model.analysis.evaluation import DriveSample, dice, drive_metrics, drive_samples
from model.analysis.fov import fov_diameter, fov_mask
from model.analysis.vesselnet import VesselUNet
from model.analysis.vessels import REFERENCE_FOV_DIAMETER, WEIGHTS, NetworkVessels, normalised_green

FIGURES = Path(__file__).with_name("vesselnet_training")
PATCH = 80


def render_variant(
    sample: DriveSample, rng: np.random.Generator, plain: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(features (2, H, W), label (H, W) float with -1 outside the FOV) of one augmented rendering."""
    rgb = sample.rgb.astype(np.float32) / 255.0
    truth = sample.truth.astype(np.float32)
    fov = fov_mask(sample.rgb)
    if not plain:
        scale = float(rng.uniform(0.8, 1.25))
        shape = (round(rgb.shape[0] * scale), round(rgb.shape[1] * scale))
        rgb = resize(rgb, shape + (3,), order=1, anti_aliasing=scale < 1, preserve_range=True).astype(
            np.float32
        )
        truth = resize(truth, shape, order=1, preserve_range=True)
        fov = resize(fov.astype(np.float32), shape, order=0, preserve_range=True) > 0.5
        leak = float(rng.uniform(0.0, 0.35))
        rgb[..., 1] = (1 - leak) * rgb[..., 1] + leak * rgb[..., 0]
        rgb = np.clip(rgb * rng.uniform(0.6, 1.3), 0, 1) ** rng.uniform(0.6, 1.6)
        blur = float(rng.uniform(0.0, 1.2))
        if blur > 0.3:
            rgb = ndi.gaussian_filter(rgb, (blur, blur, 0))
        rgb = rgb + rng.normal(0, rng.uniform(0, 0.015), rgb.shape).astype(np.float32)
    features = normalised_green(rgb, fov, fov_diameter(fov))
    label = np.where(fov, (truth > 0.5).astype(np.float32), -1.0)
    return features, label


def patches(renders, rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(batch):
        features, label = renders[rng.integers(len(renders))]
        h, w = label.shape
        y0, x0 = rng.integers(0, h - PATCH), rng.integers(0, w - PATCH)
        x = features[:, y0 : y0 + PATCH, x0 : x0 + PATCH]
        y = label[y0 : y0 + PATCH, x0 : x0 + PATCH]
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))[:, None]


def loss_fn(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    valid = (label >= 0).float()
    target = label.clamp(min=0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=valid, reduction="sum")
    bce = bce / valid.sum().clamp(min=1)
    prob = torch.sigmoid(logits) * valid
    soft_dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + (target * valid).sum() + 1)
    return bce + soft_dice


def best_threshold(net: VesselUNet, samples: list[DriveSample]) -> float:
    """Threshold maximising pooled Dice on the training images."""
    net.eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(FIGURES / "tmp.safetensors"))
    segmenter = NetworkVessels(FIGURES / "tmp.safetensors")
    (FIGURES / "tmp.safetensors").unlink()
    probs, truths = [], []
    for s in samples:
        own = fov_mask(s.rgb)
        probs.append(segmenter.probability(s.rgb.astype(np.float32) / 255.0, own, fov_diameter(own))[s.fov])
        truths.append(s.truth[s.fov])
    prob, truth = np.concatenate(probs), np.concatenate(truths)
    candidates = np.arange(0.2, 0.8, 0.02)
    scores = [dice(prob >= t, truth) for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drive", type=Path, default=Path("../shared/data/fundus/DRIVE"))
    parser.add_argument("--minutes", type=float, default=35.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="continue from these weights (safetensors)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the cosine schedule")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    FIGURES.mkdir(exist_ok=True)
    train = drive_samples(args.drive, "train")
    renders = [render_variant(s, rng, plain=(v == 0)) for s in train for v in range(args.variants)]
    print(
        f"{len(renders)} renderings of {len(train)} images at FOV ≈ {REFERENCE_FOV_DIAMETER:.0f} px",
        flush=True,
    )

    net = VesselUNet()
    if args.init is not None:
        from safetensors.torch import load_file

        state = load_file(str(args.init))
        state.pop("threshold", None)
        net.load_state_dict(state)
    params = sum(p.numel() for p in net.parameters())
    optimiser = torch.optim.Adam(net.parameters(), lr=args.lr)
    budget = args.minutes * 60.0
    start = time.monotonic()
    history: list[tuple[int, float, float]] = []
    step, running = 0, None
    while (elapsed := time.monotonic() - start) < budget:
        lr = 1e-5 + 0.5 * (args.lr - 1e-5) * (1 + math.cos(math.pi * elapsed / budget))
        for group in optimiser.param_groups:
            group["lr"] = lr
        net.train()
        x, y = patches(renders, rng, args.batch)
        loss = loss_fn(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        step += 1
        if step % 25 == 0:
            history.append((step, elapsed, running))
            print(f"step {step} {elapsed / 60:.1f} min loss {running:.4f} lr {lr:.2e}", flush=True)

    threshold = best_threshold(net, train)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state["threshold"] = torch.tensor(threshold)
    save_file(state, str(WEIGHTS))
    test = drive_samples(args.drive, "test")
    metrics = drive_metrics(NetworkVessels(), test)
    report = {
        "parameters": params,
        "steps": step,
        "batch": args.batch,
        "patch": PATCH,
        "minutes": args.minutes,
        "initialised_from": str(args.init) if args.init else None,
        "peak_lr": args.lr,
        "threads": args.threads,
        "threshold": threshold,
        "drive_test_1st_observer_in_fov": metrics.__dict__,
    }
    (FIGURES / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h[0] for h in history], [h[2] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("BCE + soft Dice (running mean)")
    ax.set_title(f"Vessel U-Net ({params / 1e6:.2f} M params), DRIVE train")
    fig.tight_layout()
    fig.savefig(FIGURES / "loss.png", dpi=100)
    print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    main()
