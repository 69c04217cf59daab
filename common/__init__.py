"""Torch-free shared code: classes, image spec, loading, the one preprocessing function, metrics, errors."""
