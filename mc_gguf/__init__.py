"""mc-gguf: Mixture Compressor for Mixture-of-Experts models, as GGUF for llama.cpp."""

__version__ = "0.1.0"
