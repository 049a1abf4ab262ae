"""The other weight matrices (attention, output head) at their plan's types, quantized as the experts are.

The converter (gguf_io/convert.py) produces them and calls this encoder for
each: ggml's quantizer with the importance matrix the calibration measured
for the tensor (llama-quantize's --imatrix), and where the calibration kept
its input's Hessian (calibrate --hessian; calibrate/tensors.py) GPTQ on it
(gptq.py), then tuning (tune.py), as experts.py quantizes an expert's
projections. gguf-py's own types (F16, BF16, Q8_0) and tensors without
statistics (norms, the router) are encoded as they are.
"""

from __future__ import annotations

import gguf
import numpy as np

from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.gguf_io.convert import GGUF_PY_TYPES, encode
from mc_gguf.quantize.gptq import gptq_quantize
from mc_gguf.quantize.tune import TuneSettings, tune_quantize


class TensorEncoder:
    """convert.Encoder for quantize: ``encoder(name, data, qtype)`` -> ggml's bytes of GGUF tensor ``name``. With
    ``gptq`` (and ``tune``) the tensors whose Hessian ``stats`` hold are quantized on it."""

    def __init__(self, stats: CalibrationStats | None, gptq: bool = False, tune: TuneSettings | None = None):
        self.stats, self.gptq, self.tune = stats, gptq, tune

    def __call__(self, name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        if self.stats is None or qtype == gguf.GGMLQuantizationType.F32 or qtype in GGUF_PY_TYPES:
            return encode(data, qtype)
        importance = self.stats.importance(name, data.shape[-1])
        hessian = self.hessian(name, data.shape)
        if hessian is None:
            return encode(data, qtype, importance)
        weights = np.asarray(data, dtype=np.float32)
        if self.tune is not None:
            return tune_quantize(weights, hessian, qtype, importance, self.tune)
        return gptq_quantize(weights, hessian, qtype, importance)

    def hessian(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The Hessian of a matrix of ``shape`` GPTQ quantizes ``name`` on, None where there is none to use."""
        tensor = self.stats.tensors.get(name) if self.stats is not None else None
        if not self.gptq or tensor is None or tensor.hessian is None or len(shape) != 2:
            return None
        hessian = tensor.hessian()
        return hessian if hessian.shape == (shape[1], shape[1]) else None
