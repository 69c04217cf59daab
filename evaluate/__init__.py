"""Evaluation and failure-mode analysis (xray-eval): the same numbers from a checkpoint or an ONNX model."""
