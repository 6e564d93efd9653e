"""RetinalGPT inference benchmark: our batched engine versus a one-image-at-a-time loop like the paper's code.

(a) ``cpu``: the ``tiny`` preset (or ``--model DIR``), full protocol (4 tasks + likelihood scoring of 3 graded
    conditions) per image, at batch 1 and batch 8; seconds per image, and the same images through a reference
    loop (one image and one question at a time, ``model.generate``). Target ≤ 2 s/image.
(b) ``gpu``: the ``paper`` preset (CLIP ViT-L/14-224 + LLaMA-7B shapes) with random weights, answers forced to
    ``--tokens`` (256) tokens. Reference: fp16, one image and one question at a time with ``model.generate``
    (the v0 eval loop). Ours: bf16 + SDPA, all 4 questions of all images of a batch in one decode, over a batch
    sweep. Reports images/s, speed-up versus the reference, and decode bandwidth: bytes read per decode step
    (language-model weights + the KV cache so far) × steps / decode time, against the card's HBM peak.
    Targets: ≥ 10× the reference, ≥ 60 % of HBM peak at the best batch.

Usage::

    python bench/inference.py cpu [--images 8] [--tokens 64] [--threads 1] [--model DIR [--natural]]
    python bench/inference.py gpu [--batches 1,2,4,8,16] [--tokens 256] [--reference-images 2] [--hbm-peak-gbs N]
    python bench/inference.py gpu --device cpu --preset tiny --tokens 8 --batches 1,2 --reference-images 1  # dry run

Prints a table and one JSON line (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import protocol
from model.engine import EngineOptions, RetinalGPTEngine
from model.schema import Condition

HBM_PEAK_GBS = {
    "H200": 4800.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
}
SCORED = (Condition.DIABETIC_RETINOPATHY, Condition.DIABETIC_MACULAR_EDEMA, Condition.GLAUCOMA)


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    """The real fundus photograph scikit-image ships, cropped and shifted differently per image."""
    from skimage import data

    base = data.retina()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        dy, dx = rng.integers(0, 120, size=2)
        out.append(np.ascontiguousarray(base[dy : dy + 1280, dx : dx + 1280]))
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def engine_for(
    args: argparse.Namespace, batch: int, device: str, dtype: str, forced: int | None
) -> RetinalGPTEngine:
    options = EngineOptions(
        device=device, dtype=dtype, batch_size=batch, max_new_tokens=args.tokens, force_new_tokens=forced
    )  # type: ignore[arg-type]
    if args.model:
        return RetinalGPTEngine.load(Path(args.model), options)
    return _preset_engine(args.preset, device, dtype, options)


_PRESET_CACHE: dict[tuple[str, str, str], Any] = {}


def _preset_engine(name: str, device: str, dtype: str, options: EngineOptions) -> RetinalGPTEngine:
    import torch

    from model.presets import build_model

    key = (name, device, dtype)
    if key not in _PRESET_CACHE:
        _PRESET_CACHE.clear()
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        _PRESET_CACHE[key] = build_model(name, device=device, dtype=torch_dtype)
    model, tokenizer, metadata = _PRESET_CACHE[key]
    model.config._attn_implementation = "sdpa"
    return RetinalGPTEngine.from_model(model, tokenizer, metadata, options)


def full_protocol(engine: RetinalGPTEngine, batch_images: list[np.ndarray]) -> None:
    """What ``analyze`` does per batch, with a fixed scoring load: generation of the 4 answers, then likelihood
    scoring of the graded conditions (a random model's answers do not parse, so scoring is requested here)."""
    results = engine.analyze(batch_images)
    assert len(results) == len(batch_images)
    prompt = engine.encode(engine.template.prompt(protocol.question(protocol.Task.DISEASE_GRADE)))
    groups = []
    for index in range(len(batch_images)):
        for condition in SCORED:
            lines = [protocol.render_condition_line(condition, g) for g in range(len(_grades(condition)))]
            groups.append((index, [engine._continuation(" ", line) for line in lines]))
    engine.score_candidates([prompt] * len(batch_images), engine.image_features(batch_images), groups)


def _grades(condition: Condition) -> range:
    from model.schema import max_grade

    return range(max_grade(condition) + 1)


def reference_loop(engine: RetinalGPTEngine, batch_images: list[np.ndarray], tokens: int, forced: bool = True) -> int:
    """The paper's way: per image, per question, ``model.generate`` on one prompt; returns tokens generated.
    ``forced``: every answer is exactly ``tokens`` long, else answers stop at EOS (at most ``tokens``)."""
    import torch

    generated = 0
    for image in batch_images:
        for task in protocol.Task:
            ids = torch.tensor(
                [engine.encode(engine.template.prompt(protocol.question(task)))], device=engine.device
            )
            with torch.inference_mode():
                out = engine.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=engine.pixel_values([image]),
                    do_sample=False,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens if forced else None,
                    use_cache=True,
                )
            generated += out.shape[1] - ids.shape[1]
    return generated


def cpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    pictures = images(args.images)
    report: dict[str, Any] = {
        "bench": "inference-cpu",
        "model": args.model or "preset:tiny (random weights)",
        "images": args.images,
        "forced_tokens": None if args.natural else args.tokens,
        "threads": args.threads,
        "runs": {},
    }
    for batch in (1, 8):
        engine = engine_for(args, batch, "cpu", "float32", None if args.natural else args.tokens)
        full_protocol(engine, pictures[:1])  # warm-up
        start = time.perf_counter()
        for first in range(0, len(pictures), batch):
            full_protocol(engine, pictures[first : first + batch])
        elapsed = time.perf_counter() - start
        report["runs"][f"batch{batch}"] = {"seconds_per_image": elapsed / len(pictures)}
    engine = engine_for(args, 1, "cpu", "float32", None)
    subset = pictures[: args.reference_images]
    start = time.perf_counter()
    reference_loop(engine, subset, args.tokens, forced=not args.natural)
    report["runs"]["reference_loop"] = {"seconds_per_image": (time.perf_counter() - start) / len(subset)}
    ref = report["runs"]["reference_loop"]["seconds_per_image"]
    for run in report["runs"].values():
        run["speedup_vs_reference"] = ref / run["seconds_per_image"]
    lengths = "answers of their own length" if args.natural else f"{args.tokens} forced tokens per answer"
    print(f"CPU, {args.model or 'tiny'}, {lengths}, {args.threads} thread(s)")
    print(f"{'run':<16}{'s/image':>10}{'× reference':>14}")
    for name, run in report["runs"].items():
        print(f"{name:<16}{run['seconds_per_image']:>10.3f}{run['speedup_vs_reference']:>14.1f}")
    return report


def _lm_weight_bytes(engine: RetinalGPTEngine) -> int:
    lm = engine.model.model.language_model
    return (
        sum(p.numel() * p.element_size() for p in lm.parameters())
        + engine.model.lm_head.weight.numel() * engine.model.lm_head.weight.element_size()
    )


def _kv_bytes_per_token(engine: RetinalGPTEngine) -> int:
    config = engine.model.config.text_config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * engine.compute_dtype.itemsize


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the gpu benchmark needs a CUDA device (--device cpu only dry-runs the code path)")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    peak = args.hbm_peak_gbs or next((v for k, v in HBM_PEAK_GBS.items() if k in name), None)
    batches = [int(b) for b in args.batches.split(",")]
    pictures = images(max(batches + [args.reference_images]))
    report: dict[str, Any] = {
        "bench": "inference-gpu",
        "device": name,
        "hbm_peak_gbs": peak,
        "preset": args.preset,
        "forced_tokens": args.tokens,
        "runs": {},
    }

    reference = engine_for(args, 1, device, "float16", None)
    reference_loop(reference, pictures[:1], 8)  # warm-up
    sync()
    start = time.perf_counter()
    reference_loop(reference, pictures[: args.reference_images], args.tokens)
    sync()
    ref_ips = args.reference_images / (time.perf_counter() - start)
    report["runs"]["reference_fp16_loop"] = {"images_per_s": ref_ips}
    _PRESET_CACHE.clear()
    del reference
    if device == "cuda":
        torch.cuda.empty_cache()

    for batch in batches:
        engine = engine_for(args, batch, device, "bfloat16", args.tokens)
        subset = pictures[:batch]
        tasks = len(protocol.Task)
        features = engine.image_features(subset)
        rows = [
            engine.encode(engine.template.prompt(protocol.question(t))) for _ in subset for t in protocol.Task
        ]
        row_image = [i for i in range(len(subset)) for _ in range(tasks)]
        engine.generate_tokens(rows, features, row_image)  # warm-up
        engine.generate_tokens(rows, features, row_image)
        timing = engine.last_timing
        assert timing is not None
        start = time.perf_counter()
        full_protocol(engine, subset)
        sync()
        total_s = time.perf_counter() - start
        decode_s, prefill_s = timing.decode_s, timing.prefill_s
        steps = timing.steps - 1  # the first token comes from the prefill
        prompt_len = timing.prompt_tokens
        kv_token = _kv_bytes_per_token(engine)
        kv_read = sum(len(rows) * (prompt_len + i) * kv_token for i in range(1, steps + 1))
        gbs = (steps * _lm_weight_bytes(engine) + kv_read) / decode_s / 1e9
        report["runs"][f"batch{batch}"] = {
            "images_per_s": batch / total_s,
            "speedup_vs_reference": batch / total_s / ref_ips,
            "decode_gbs": gbs,
            "hbm_fraction": gbs / peak if peak else None,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "rows": len(rows),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        }
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
    print(
        f"{name}, preset {args.preset} random weights, {args.tokens} forced tokens per answer, HBM peak {peak} GB/s"
    )
    print(f"{'run':<22}{'images/s':>10}{'× ref':>8}{'decode GB/s':>13}{'% HBM':>8}")
    for key, run in report["runs"].items():
        fraction = run.get("hbm_fraction")
        print(
            f"{key:<22}{run['images_per_s']:>10.3f}{run.get('speedup_vs_reference', 1.0):>8.1f}"
            f"{run.get('decode_gbs', 0.0):>13.0f}{(fraction or 0) * 100:>8.0f}"
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("cpu", "gpu"))
    parser.add_argument("--model", help="model directory (default: the preset with random weights)")
    parser.add_argument("--preset", default=None, help="preset when no --model (cpu: tiny, gpu: paper)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=None, help="forced answer length (cpu 64, gpu 256)")
    parser.add_argument(
        "--natural", action="store_true", help="cpu: answers stop at their own length (use with a trained --model)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference-images", type=int, default=2)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--hbm-peak-gbs", type=float, default=None)
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="gpu mode: cpu only dry-runs the code"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.preset = args.preset or ("tiny" if args.mode == "cpu" else "paper")
    args.tokens = args.tokens or (64 if args.mode == "cpu" and not args.natural else 256)
    report = cpu(args) if args.mode == "cpu" else gpu(args)
    line = json.dumps(report)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
