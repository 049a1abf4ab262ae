"""loader/: the patched runtime loading a GGUF (model.py)."""
