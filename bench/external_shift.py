"""How much of the model's drop on the external EyePACS subset is the photographs' size and framing?

The EyePACS subset (evaluation only) holds 400×400 JPEGs whose field of view fills the square and is cut at every
side; every training camera gives larger photographs with the whole width of the FOV. This script scores the
IDRiD test split (referable DR: P(DR grade ≥ 2), the bundled model's calibrated assessment, the production path)
as stored and degraded to look like the EyePACS subset:

* ``400 px``: resized to 400 px on the long side, JPEG quality 75;
* ``square 400``: the centred square of the photograph's height (the FOV cut left and right), 400×400, JPEG 75;
* ``square 400, half resolution``: the same square through 200×200 and back (lost detail), JPEG 75.

If the AUC of the degraded IDRiD photographs stays far above the model's EyePACS AUC, the external miss is the
camera and population, not resolution or framing.

    python bench/external_shift.py [--model DIR]
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from model.engine import EngineOptions, RetinalGPTEngine
from model.schema import Condition
from training.adapters import load_dataset
from training.metrics import bootstrap_auc_ci, roc_auc

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fundus"
BUNDLED = Path(__file__).resolve().parents[1] / "model" / "bundled" / "retinalgpt-tiny"
REFERABLE_GRADE = 2


def _jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _long_side_400(image: Image.Image) -> Image.Image:
    scale = 400 / max(image.size)
    return _jpeg(image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR))


VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "as stored": lambda image: image,
    "400 px": _long_side_400,
    "square 400": lambda image: _jpeg(_square(image).resize((400, 400), Image.Resampling.BILINEAR)),
    "square 400, half resolution": lambda image: _jpeg(
        _square(image).resize((200, 200), Image.Resampling.BILINEAR).resize((400, 400), Image.Resampling.BILINEAR)),
}


def referable_probability(engine: RetinalGPTEngine, rgb: np.ndarray) -> float:
    """Calibrated P(DR grade ≥ 2) of one photograph, as the engine's complete assessment gives it."""
    answers = engine.assess(engine.image_features([rgb]))[0]
    key = next(key for key in answers if key.endswith(Condition.DIABETIC_RETINOPATHY.value))
    return float(sum(answers[key][REFERABLE_GRADE:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED)
    args = parser.parse_args()
    if not (SHARED / "idrid_grading").is_dir():
        raise SystemExit(f"needs the shared IDRiD grading set in {SHARED / 'idrid_grading'}")
    engine = RetinalGPTEngine.load(args.model, EngineOptions())
    records = [r for r in load_dataset("idrid_grading", SHARED / "idrid_grading") if r.split == "test"]
    truth = [int(r.grades[Condition.DIABETIC_RETINOPATHY] >= REFERABLE_GRADE) for r in records]
    scores: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for record in records:
        photograph = Image.open(record.image).convert("RGB")
        for name, degrade in VARIANTS.items():
            scores[name].append(referable_probability(engine, np.asarray(degrade(photograph))))
    print(f"{engine.metadata.name} {engine.metadata.version}: referable DR on the IDRiD test split "
          f"({len(truth)} photographs, {sum(truth)} referable)")
    print(f"{'variant':<30} {'AUC':>6} {'95 % CI':>15} {'mean P':>7}")
    for name, values in scores.items():
        low, high = bootstrap_auc_ci(truth, values)
        print(f"{name:<30} {roc_auc(truth, values):>6.3f} {f'{low:.3f}–{high:.3f}':>15} {np.mean(values):>7.3f}")


if __name__ == "__main__":
    main()
