"""Converters from released checkpoint layouts to the RetinalGPT model directory (:mod:`model.checkpoint`).

``llava-med-v0``  the RetinalGPT release / LLaVA-Med v1.0 layout (``LlavaLlamaForCausalLM``), see
                  :mod:`model.importers.llava_v0`.
``hf-llava``      a native transformers ``LlavaForConditionalGeneration`` directory, see :mod:`model.importers.hf_llava`.

``import_checkpoint(fmt, source, dest, vision_tower=None, name="retinalgpt", mm_projector=None)`` writes a complete
model directory at ``dest`` and returns it; register it with :class:`model.registry.ModelRegistry` to use it.
``mm_projector`` is the separate projector file of a ``llava-med-v0`` checkpoint that ships it apart.
"""

from __future__ import annotations

from pathlib import Path

FORMATS = ("llava-med-v0", "hf-llava")


def import_checkpoint(
    fmt: str,
    source: Path,
    dest: Path,
    vision_tower: Path | None = None,
    name: str = "retinalgpt",
    mm_projector: Path | None = None,
) -> Path:
    """Convert ``source`` (layout ``fmt``) into a model directory at ``dest``."""
    if fmt == "llava-med-v0":
        from model.importers.llava_v0 import import_llava_v0

        if vision_tower is None:
            raise ValueError("--format llava-med-v0 needs --vision-tower DIR (a local CLIP ViT directory)")
        return import_llava_v0(
            Path(source), Path(vision_tower), Path(dest), name=name,
            mm_projector=Path(mm_projector) if mm_projector is not None else None,
        )
    if mm_projector is not None:
        raise ValueError("--mm-projector belongs to --format llava-med-v0")
    if fmt == "hf-llava":
        from model.importers.hf_llava import import_hf_llava

        return import_hf_llava(Path(source), Path(dest), name=name)
    raise ValueError(f"unknown checkpoint format {fmt!r} (known: {', '.join(FORMATS)})")
