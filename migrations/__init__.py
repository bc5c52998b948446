"""Alembic migrations of the catalog schema (run by clipsearch db upgrade and the indexer)."""
