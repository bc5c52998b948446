"""Zero-shot labels: set definitions, scoring vectors against them, labels in the catalog."""
