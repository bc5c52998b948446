"""Tests of the indexer's jobs and the clipsearch command."""
