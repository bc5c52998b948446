"""Tests of retrieval.labels: definitions, scoring, and the label store."""
