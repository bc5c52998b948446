"""Tests of retrieval.index: index kinds, shard files, the shard set, GPU placement."""
