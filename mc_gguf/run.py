"""Load a GGUF in llama-cpp-python and generate text."""

from __future__ import annotations

from pathlib import Path

from mc_gguf.errors import GGUFFileError, RuntimeMissingError


def load(path: str | Path, **llama_kwargs):
    """A ``llama_cpp.Llama`` for ``path``, with a clear error for a missing file or runtime."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(f"{path}: no such file")
    try:
        from llama_cpp import Llama
    except ImportError:
        raise RuntimeMissingError("llama_cpp is not installed; run `mc-gguf runtime build`") from None
    llama_kwargs.setdefault("verbose", False)
    llama_kwargs.setdefault("n_ctx", 2048)
    try:
        return Llama(model_path=str(path), **llama_kwargs)
    except ValueError as exc:  # llama-cpp-python raises ValueError when llama.cpp refuses the file
        raise GGUFFileError(f"{path}: llama.cpp could not load it ({exc})") from None


def generate(path: str | Path, prompt: str, max_tokens: int = 32, *, temperature: float = 0.0, seed: int = 0, **llama_kwargs) -> str:
    llm = load(path, seed=seed, **llama_kwargs)
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
    return out["choices"][0]["text"]
