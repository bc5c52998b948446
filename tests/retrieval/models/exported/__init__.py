"""Tests of running a model from its ONNX export alone (retrieval/models/exported)."""
