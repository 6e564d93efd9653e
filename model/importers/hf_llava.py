"""Import a native transformers ``LlavaForConditionalGeneration`` directory (``--format hf-llava``).

The weights, config and tokenizer are copied unchanged (so the checkpoint SHA-256 is the source's); a
``retinalgpt.json`` is kept when the source has one (a RetinalGPT model exported elsewhere) and written otherwise,
with the image size and token count from the vision config, normalisation from ``preprocessor_config.json`` and
the default protocol template using the tokenizer's ``<image>`` token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from model.checkpoint import (
    CLIP_MEAN,
    CLIP_STD,
    METADATA_FILE,
    CheckpointError,
    ImageSpec,
    ModelMetadata,
    read_metadata,
    validate_model_dir,
    weight_files,
    write_metadata,
)

COPIED = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def import_hf_llava(source: Path, dest: Path, name: str = "retinalgpt") -> Path:
    """Copy the Llava directory ``source`` into ``dest`` as a RetinalGPT model directory and validate it."""
    source, dest = Path(source), Path(dest)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{source} is not a model directory: config.json is missing")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type") != "llava":
        raise CheckpointError(f"{source}: model_type {config.get('model_type')!r} is not 'llava'")
    if not weight_files(source):
        raise CheckpointError(
            f"{source}: no *.safetensors weights (convert .bin checkpoints with transformers first)"
        )
    if not (source / "tokenizer.json").is_file():
        raise CheckpointError(f"{source}: tokenizer.json is missing")
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in COPIED:
        for file in source.glob(pattern):
            shutil.copy2(file, dest / file.name)
    if (source / METADATA_FILE).is_file():
        metadata = read_metadata(source)
    else:
        vision = config.get("vision_config") or {}
        size, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 14))
        mean, std = CLIP_MEAN, CLIP_STD
        processor = source / "preprocessor_config.json"
        if processor.is_file():
            raw = json.loads(processor.read_text(encoding="utf-8"))
            mean = tuple(raw.get("image_mean", mean))  # type: ignore[assignment]
            std = tuple(raw.get("image_std", std))  # type: ignore[assignment]
        metadata = ModelMetadata(
            name=name,
            image=ImageSpec(size=size, image_tokens=(size // patch) ** 2, mean=mean, std=std),
            provenance={"source": str(source), "format": "hf-llava"},
        )
    write_metadata(dest, metadata)
    validate_model_dir(dest)
    return dest
