"""Tests of retrieval.catalog on SQLite and Postgres: commits, reads, copies."""
