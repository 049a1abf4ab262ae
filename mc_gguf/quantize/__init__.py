"""Stage 3, quantize: each expert at its planned type with ggml's own quantizers, written as GGUF.

    quantize(model_dir, plan, out, stats=...) -> Path   (the GGUF)

quantization.py (the verb and the plan's metadata), gptq.py (GPTQ whose
rounding step is ggml's quantizer), tune.py (GPTQ, then coordinate descent on
the K-quant integers and the i-quant scales).
"""

from mc_gguf._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "quantize": "quantization",
    "gptq_quantize": "gptq",
})
