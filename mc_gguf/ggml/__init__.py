"""ggml's formats: the candidate types (types.py, plain data) and ggml's own quantizers through ctypes (quants.py).
Every stage uses them, so they sit below all stages."""
