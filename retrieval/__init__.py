"""Core library: models, images, the index, the catalog, labels and search; no HTTP, no CLI."""
