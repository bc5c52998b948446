"""Training and measuring models: fine-tuning, losses, data readers, evaluation, demo shapes."""
