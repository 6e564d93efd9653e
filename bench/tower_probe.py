"""Frozen-tower linear probes: how much of each label an ImageNet EfficientNet-Lite tower encodes, per input size.

For every record of the shared datasets (train splits of the training sets; test splits of all, including the
evaluation-only EyePACS and HEI-MED), the photograph is framed on its field of view (``fov_square``) at each size,
passed through the frozen ImageNet tower, and its global-average-pooled head features are kept. One
L2-regularised logistic regression per binary task (training.tasks) is fitted on the train features (standardised;
λ chosen by 5-fold cross-validation on train) and scored by ROC AUC on every test split that labels the task.

    python bench/tower_probe.py --sizes 224,384,512 [--variant lite0] [--max-train 400] [--normalise local-contrast]

``--normalise local-contrast`` probes the tower on photographs with their local background removed (each framed
photograph minus its Gaussian blur, σ = size / 30, scaled ×4 around mid-grey inside 90 % of the FOV; B. Graham's
preprocessing that won the Kaggle 2015 DR challenge): a test of whether camera colour and illumination are what the
external sets differ in.

Prints one table per size and writes bench/out/tower_probe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from model.vision.efficientnet_lite import (
    EfficientNetLiteConfig,
    EfficientNetLiteVisionModel,
    imagenet_weights_file,
    load_imagenet_state_dict,
)
from model.vision.preprocess import fov_square
from training.adapters import load_dataset
from training.images import cached_pixels
from training.metrics import roc_auc
from training.tasks import TASKS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fundus"
TRAINING = ("CODRAS", "idrid_grading", "odir5k_subset", "oct_eye_fundus_mx", "palm_pm")
EVALUATION_ONLY = ("eyepacs_kaggle_dr", "HEI-MED")


def features(model: EfficientNetLiteVisionModel, pixels: np.ndarray) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), 32):
            x = torch.from_numpy(np.array(pixels[start:start + 32])).permute(0, 3, 1, 2).float() / 255.0
            out.append(model.feature_map((x - 0.5) / 0.5).mean(dim=(2, 3)).numpy())
    return np.concatenate(out)


def local_contrast(pixels: np.ndarray) -> np.ndarray:
    """Graham's local-contrast normalisation of framed ``N×S×S×3`` uint8 photographs (FOV centred, filling S)."""
    from scipy.ndimage import gaussian_filter

    size = pixels.shape[1]
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 <= (0.45 * size) ** 2
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):
        rgb = image.astype(np.float32)
        blurred = gaussian_filter(rgb, sigma=(size / 30, size / 30, 0))
        normalised = np.clip(4 * (rgb - blurred) + 128, 0, 255)
        out[i] = np.where(inside[..., None], normalised, 128).astype(np.uint8)
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def choose_lambda(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
    folds = rng.permutation(len(y)) % 5
    best, best_auc = 1e-2, -1.0
    for lam in (1e-4, 1e-3, 1e-2, 1e-1):
        aucs = []
        for k in range(5):
            train, val = folds != k, folds == k
            if len(set(y[val])) < 2:
                continue
            w, b = fit_logistic(x[train], y[train], lam)
            aucs.append(roc_auc(y[val], x[val] @ w + b))
        if aucs and np.mean(aucs) > best_auc:
            best, best_auc = lam, float(np.mean(aucs))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224,384,512")
    parser.add_argument("--variant", default="lite0")
    parser.add_argument("--max-train", type=int, default=None, help="train records per dataset (seeded sample)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("bench/out/cache"))
    parser.add_argument("--normalise", choices=("none", "local-contrast"), default="none")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    train, test = [], []
    for kind in TRAINING + EVALUATION_ONLY:
        records = load_dataset(kind, SHARED / kind)
        test += [r for r in records if r.split == "test"]
        pool = [r for r in records if r.split == "train" and kind in TRAINING]
        if args.max_train and len(pool) > args.max_train:
            pool = [pool[i] for i in sorted(rng.choice(len(pool), args.max_train, replace=False))]
        train += pool
    records = train + test
    report: dict[str, dict] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        started = time.time()
        pixels = cached_pixels(records, size, args.cache, preprocess=lambda rgb, s=size: fov_square(rgb, s),
                               tag="fov_square")
        if args.normalise == "local-contrast":
            pixels = local_contrast(np.asarray(pixels))
        model = EfficientNetLiteVisionModel(EfficientNetLiteConfig(variant=args.variant, image_size=size)).eval()
        load_imagenet_state_dict(model, torch.load(imagenet_weights_file(args.variant), map_location="cpu"))
        feats = features(model, pixels)
        seconds = time.time() - started
        ntrain = len(train)
        mean, std = feats[:ntrain].mean(0), feats[:ntrain].std(0) + 1e-6
        feats = (feats - mean) / std
        table: dict[str, dict[str, float]] = {}
        for task in (t for t in TASKS if t.classes == 2):
            ytr = np.array([task.label(r) if task.label(r) is not None else -1 for r in train])
            keep = ytr >= 0
            if len(set(ytr[keep])) < 2:
                continue
            lam = choose_lambda(feats[:ntrain][keep], ytr[keep], rng)
            w, b = fit_logistic(feats[:ntrain][keep], ytr[keep].astype(float), lam)
            for dataset in sorted({r.dataset for r in test}):
                rows = [i for i, r in enumerate(test) if r.dataset == dataset and task.label(r) is not None]
                y = np.array([task.label(test[i]) for i in rows])
                if len(set(y)) == 2:
                    scores = feats[ntrain:][rows] @ w + b
                    table.setdefault(dataset, {})[task.name] = round(roc_auc(y, scores), 3)
        report[str(size)] = {"auc": table, "feature_seconds": round(seconds, 1), "train_images": ntrain}
        print(f"size {size}: features in {seconds:.0f} s", flush=True)
        for dataset, aucs in table.items():
            print(f"  {dataset:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in aucs.items()), flush=True)
    suffix = "" if args.normalise == "none" else f"-{args.normalise}"
    out = Path(f"bench/out/tower_probe{suffix}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
