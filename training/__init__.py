"""Dataset adapters, instruction data, two-stage trainer, evaluation and model registry."""
