"""mc-gguf: Mixture Compressor for Mixture-of-Experts models, as GGUF for llama.cpp."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # mc_gguf.load without importing llama_cpp (and its library) at package import
    if name == "load":
        from mc_gguf.evaluate.run import load

        return load
    raise AttributeError(f"module 'mc_gguf' has no attribute {name!r}")
