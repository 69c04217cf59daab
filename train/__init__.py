"""Training: datasets, model registry, the two-phase loop (see the trainer issue)."""
