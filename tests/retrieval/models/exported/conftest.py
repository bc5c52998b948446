"""The tiny model's spec and a copy of its export cache, as the runtime tests have them."""

from tests.retrieval.models.runtimes.conftest import export_cache, tiny_spec

__all__ = ["export_cache", "tiny_spec"]
