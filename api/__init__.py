"""The HTTP API (FastAPI): search, images, labels and the web page over one index generation."""
