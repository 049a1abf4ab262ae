"""Stage 1, calibrate: run the checkpoint on text, one decoder layer in memory at a time, and measure every expert.

    calibrate(model_dir, out, text, settings) -> CalibrationStats   (a safetensors file, stats.py)

text.py (the calibration text and its sequences), forward.py (the streamed
forward through transformers' decoder layers), moe.py (the MoE block with
its statistics), quant_error.py (eps: the block's output error with one
expert quantized), workdir.py (resuming), stats.py (the artifact).
"""

from mc_gguf._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "calibrate": "calibration",
    "CalibrationSettings": "settings",
    "CalibrationStats": "stats",
    "LayerStats": "stats",
    "load_stats": "stats",
    "CalibrationText": "text",
    "read_text": "text",
})
