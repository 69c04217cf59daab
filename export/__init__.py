"""ONNX export, int8 quantization and verification (xray-export)."""
