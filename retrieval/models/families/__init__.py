"""One module per model family, each with a load(spec, device, precision) -> ModelBackend."""
