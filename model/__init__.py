"""RetinalGPT runtime (LLaVA-format model, engine, prompts, parsing) and the measurement pipeline."""
