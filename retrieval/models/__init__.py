"""Model families behind one encoder seam: weights, model identity, prompts, bundled configs."""
