"""xray-serve: the verified ONNX model behind HTTP (FastAPI + uvicorn), with a web page; no torch."""
