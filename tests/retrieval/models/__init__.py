"""Tests of retrieval.models: loading weights, identity, encoding."""
