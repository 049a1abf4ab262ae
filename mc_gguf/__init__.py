"""mc-gguf: Mixture Compressor for Mixture-of-Experts models, as GGUF for llama.cpp.

    import mc_gguf

    mc_gguf.compress("mistralai/Mixtral-8x7B-v0.1", "mixtral-mc2.5.gguf", bits=2.5)  # mc-gguf compress's defaults
    llm = mc_gguf.load("mixtral-mc2.5.gguf")                                          # a llama_cpp.Llama, pruning
    print(llm.create_completion("The capital of France is", max_tokens=8)["choices"][0]["text"])

The names are read on first use: importing the package loads neither torch nor llama.cpp.
"""

from __future__ import annotations

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "compress": "mc_gguf.pipeline",
    "convert": "mc_gguf.gguf_io.convert",
    "CompressSettings": "mc_gguf.settings",
    "OdpSettings": "mc_gguf.settings",
    "CalibrationSettings": "mc_gguf.calibrate.settings",
    "AllocateSettings": "mc_gguf.allocate.settings",
    "TuneSettings": "mc_gguf.quantize.settings",
    "McGgufError": "mc_gguf.errors",
}


def load(model: str, filename: str | None = None, **kwargs):
    """A llama_cpp.Llama of a GGUF on the patched runtime, pruning as the file says (loader/model.py ``load``
    takes the keywords: odp, mu, n_ctx, n_gpu_layers, ...). ``model`` is a GGUF file, or a Hugging Face
    repository id of GGUFs with ``filename`` the one to use (hf/hub.py gguf_file)."""
    from mc_gguf.loader.model import load as load_gguf
    from mc_gguf.hf.hub import gguf_file

    return load_gguf(gguf_file(model, filename), **kwargs)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mc_gguf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_EXPORTS, "load", "__version__"])
