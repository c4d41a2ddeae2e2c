"""Model families, one file per HF ``model_type``."""
