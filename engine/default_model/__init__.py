"""The embedded default model (trained by tools/train_default_model.py)."""
