"""What runs a loaded model's towers: torch, or ONNX Runtime on a verified export of them."""
