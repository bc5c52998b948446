"""Tests of retrieval.models.runtimes: ONNX exports of every family, and choosing a runtime."""
