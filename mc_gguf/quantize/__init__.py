"""Stage 3, quantize: each expert at its planned type with ggml's own quantizers, written as GGUF.

    quantize(model_dir, plan, out, stats=...) -> Path   (the GGUF)

quantization.py (the verb and the plan's metadata), gptq.py (GPTQ whose
rounding step is ggml's quantizer, its dampening, and the Hessian whose
factor every type shares), hessian.py (each expert's Hessians from the
calibration's inputs, and down's fit to the quantized gate and up), tune.py
(GPTQ, then coordinate descent on the K-quant integers and the i-quant
scales), tuned_errors.py (how much tuning lowers each type's error, for
allocate).
"""

from mc_gguf._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "quantize": "quantization",
    "gptq_quantize": "gptq",
})
