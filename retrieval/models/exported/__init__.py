"""Running a model from its ONNX export alone: preprocessing, tokenizers and towers, no torch."""
