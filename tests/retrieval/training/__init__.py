"""Tests of retrieval.training: fine-tuning, data readers, evaluation, the shapes generator."""
