"""open_clip JSON configs bundled with clipsearch (the tiny test and demo models)."""
