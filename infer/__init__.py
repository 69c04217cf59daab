"""Torch-free edge inference (xray-infer)."""
