"""Run and measure a GGUF on the patched runtime: load and generate (run.py), perplexity and KL divergence
as llama-perplexity measures them, with the expert slots computed and skipped (perplexity.py)."""

from mc_gguf._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "load": "run",
    "generate": "run",
    "evaluate_gguf": "perplexity",
    "EvalSettings": "perplexity",
})
