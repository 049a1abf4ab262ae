"""The other weight matrices, measured as the experts are: attention, token embeddings, output head.

What the allocation needs to put them in the budget beside the experts, and
the quantizer to quantize them with an importance matrix, as llama-quantize
does with llama-imatrix's:

- ``importance`` [n]: the mean of x^2 over the calibration tokens of each
  input column (llama-imatrix's collect_imatrix). token_embd, read by row
  (ggml_get_rows), has none, as in llama-imatrix.
- ``error`` [U]: the Frobenius norm of the change in the residual stream
  when only this tensor is quantized to tensor type u, in eps's units (over
  eps_tokens tokens, calibrate/quant_error.py), so that the integer program
  adds it to the experts' errors as it adds theirs:

  * every linear of a layer's attention: the attention's output change, the
    attention run again on the first ATTENTION_TOKENS positions of the first
    calibration sequence (a causal prefix: those positions' outputs are
    what the whole sequence gives them), its squares scaled by eps_tokens
    over those tokens;
  * token_embd: the first decoder layer's output change, the layer run again
    on the same causal prefix with those positions' embedding rows quantized
    (its MoE block not gathering statistics meanwhile), its squares scaled as
    the attention's: the change reaches the residual stream directly and
    through what the layer's attention and experts make of it (they read the
    embedding normalised, so its relative change is what they see; an
    absolute measure of the rows' change alone put Q2_K embeddings on the
    bench model at a fiftieth of an expert's error and made its files
    several times worse);
  * output: the logits' change dz = dW n (n the final norm's output) on the
    first OUTPUT_TOKENS eps tokens, taken back to the residual stream before
    the final norm as the change d of the same effect an isotropic one has:
    E|W diag(g) d / rms|^2 = |d|^2 |W diag(g)|_F^2 / (H rms^2), so
    |d|^2 = |dz|^2 H rms^2 / |W diag(g)|_F^2 (g the norm's weight, rms the
    hidden state's), its squares scaled as above.

The quantized weights are ggml's own (quant_error.ggml_roundtrip), with the
importance where the tensor has one.

With ``hessian`` (calibrate --hessian), each linear's input Hessian too,
sum of x x^T [n, n] over the first HESSIAN_TOKENS calibration tokens (as
many as an expert of Mixtral 8x7B sees of 65536 on average: 4 per input
feature at its 4096), on which quantize runs GPTQ and tuning
(quantize/tensors.py). Linears that read the same input (q, k and v read the
attention's normed hidden states) share one product: it is computed once and
stored for each. At Mixtral's shapes a layer's two products are 0.5 TFLOP.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import gguf
import numpy as np
import torch

from mc_gguf.calibrate.forward import checkpoint_weights
from mc_gguf.calibrate.moe import StatisticsMoE
from mc_gguf.calibrate.quant_error import ggml_roundtrip
from mc_gguf.calibrate.stats import TensorStats
from mc_gguf.hf.checkpoint import Checkpoint

ATTENTION_TOKENS = 1024  # positions of the first sequence the attention's errors are measured on
OUTPUT_TOKENS = 1024     # eps tokens the output head's errors are measured on
ROWS = 8192              # rows of hidden states normalised at a time for the output head's importance
HESSIAN_TOKENS = 16384   # calibration tokens each input Hessian is summed over


def gguf_name(ckpt: Checkpoint, hf_key: str) -> str | None:
    """The GGUF name of checkpoint tensor ``hf_key`` (gguf-py's TensorNameMap), None where it has none."""
    found = _name_map(ckpt.arch.gguf_arch, ckpt.n_layers).get_type_and_name(hf_key, try_suffixes=(".weight",))
    return found[1] if found else None


@functools.lru_cache(maxsize=4)
def _name_map(arch: gguf.MODEL_ARCH, n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_layers)  # every layer's names: built once, not per tensor


class AttentionProbe:
    """Hooks on a decoder layer's attention while the layer runs (a ``with`` block): the importance of every
    linear's input (and with ``hessian_tokens`` its Hessian), and the attention's inputs on the first sequence's
    first ``max_tokens`` positions, on which ``errors`` runs it again."""

    def __init__(self, attention: torch.nn.Module, max_tokens: int = ATTENTION_TOKENS, hessian_tokens: int = 0):
        self.attention = attention
        self.linears = {name: m for name, m in attention.named_modules() if isinstance(m, torch.nn.Linear)}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.prefix = KeptPrefix(attention, max_tokens)
        # each input's Hessian, over its first hessian_tokens (0: none)
        self.grams = {name: Gram(hessian_tokens) for name in self.linears} if hessian_tokens else {}
        self.reads: dict[str, str] = {}  # linear -> the linear whose input it reads (its own, or q's for k and v)
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles: list = []

    def __enter__(self) -> AttentionProbe:
        for name, linear in self.linears.items():
            self._handles.append(linear.register_forward_pre_hook(functools.partial(self._accumulate, name)))
        self.prefix.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.prefix.__exit__()
        self._last = None

    def _accumulate(self, name: str, module: torch.nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        squares = (x.double() ** 2).sum(0)
        self.sums[name] = self.sums[name] + squares if name in self.sums else squares
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]
        if self.grams:
            # the linears called in a row on the very same tensor read one input: its product is summed once
            if name not in self.reads:
                same = self._last is not None and self._last[0] is args[0]
                self.reads[name] = self._last[1] if same else name
            if self.reads[name] == name:
                self.grams[name].add(x)
            self._last = (args[0], self.reads[name])

    def importance(self, name: str) -> np.ndarray:
        return (self.sums[name] / max(self.counts[name], 1)).float().cpu().numpy()

    def errors(self, ckpt: Checkpoint, bid: int, types: Sequence[str], eps_tokens: int) -> dict[str, TensorStats]:
        """Every linear of the attention that has a GGUF name: its importance and its error at each of ``types``
        (the module docstring), the others at full precision. Call after the ``with`` block."""
        if self.prefix.inputs is None or not types:
            return {}
        args, kwargs = self.prefix.inputs
        found = {}
        with torch.no_grad():
            reference = _first(self.attention(*args, **kwargs))
            scale = eps_tokens / (reference.numel() // reference.shape[-1])
            for name, linear in self.linears.items():
                target = gguf_name(ckpt, f"model.layers.{bid}.self_attn.{name}.weight")
                if target is None or name not in self.sums:
                    continue
                importance = self.importance(name)
                original = linear.weight.data
                squares = []
                try:
                    for type_name in types:
                        linear.weight.data = ggml_roundtrip(original, type_name, importance)
                        change = _first(self.attention(*args, **kwargs)) - reference
                        squares.append(float((change.double() ** 2).sum()))
                finally:
                    linear.weight.data = original
                gram = self.grams.get(self.reads.get(name, name))
                found[target] = TensorStats(np.sqrt(np.array(squares) * scale), importance,
                                            gram.reader() if gram is not None else None)
        return found


class Gram:
    """sum of x x^T over the first ``max_tokens`` rows added: each batch's product in float32, their sum in
    float64 (a batch is a few thousand tokens)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0
        self.sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        take = min(x.shape[0], self.max_tokens - self.tokens)
        if take <= 0:
            return
        rows = x[:take].float()
        product = (rows.T @ rows).double()
        self.sum = product if self.sum is None else self.sum + product
        self.tokens += take

    def reader(self):
        """TensorStats.hessian: the sum as float32 [n, n], None where no row was added."""
        if self.sum is None:
            return None
        matrix = self.sum.float().cpu().numpy()
        return lambda: matrix


class KeptPrefix:
    """The arguments of ``module``'s first call while hooked (a ``with`` block), cut to the first sequence's first
    ``max_tokens`` positions (causal_prefix), so that it can be run again on them."""

    def __init__(self, module: torch.nn.Module, max_tokens: int = ATTENTION_TOKENS):
        self.module, self.max_tokens = module, max_tokens
        self.inputs: tuple[tuple, dict] | None = None
        self._handle = None

    def __enter__(self) -> KeptPrefix:
        self._handle = self.module.register_forward_pre_hook(self._keep, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _keep(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.inputs is None:
            self.inputs = causal_prefix(args, kwargs, self.max_tokens)


def causal_prefix(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    """An attention call's arguments cut to the first sequence's first ``n`` positions (transformers' decoder layers
    pass them by name: hidden_states [B, L, H], position_embeddings (cos, sin) [1 or B, L, d], attention_mask
    [B, 1, L, L] or None, position_ids [1 or B, L], cache_position [L])."""
    def cut(key: str, value):
        if key == "hidden_states" and torch.is_tensor(value):
            return value[:1, :n]
        if key == "position_embeddings" and isinstance(value, tuple):
            return tuple(v[:1, :n] for v in value)
        if key == "attention_mask" and torch.is_tensor(value) and value.ndim == 4:
            return value[:1, :, :n, :n]
        if key == "position_ids" and torch.is_tensor(value):
            return value[:1, :n]
        if key == "cache_position" and torch.is_tensor(value):
            return value[:n]
        return value

    return (tuple(cut("hidden_states" if i == 0 else "", a) for i, a in enumerate(args)),
            {key: cut(key, value) for key, value in kwargs.items()})


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def embedding_errors(ckpt: Checkpoint, prefix: KeptPrefix, types: Sequence[str], eps_tokens: int,
                     moe: StatisticsMoE | None = None) -> dict[str, TensorStats]:
    """token_embd's error at each of ``types`` (the module docstring): the first decoder layer run again on the
    causal prefix ``prefix`` kept of its input (the embeddings' rows), those rows quantized, its MoE block (``moe``)
    not gathering statistics meanwhile."""
    target = gguf_name(ckpt, ckpt.arch.embed_tokens)
    if target is None or not types or prefix.inputs is None:
        return {}
    (rows, *rest), kwargs = prefix.inputs
    squares = []
    with torch.no_grad(), moe.paused() if moe is not None else contextlib.nullcontext():
        reference = _first(prefix.module(rows, *rest, **kwargs))
        for type_name in types:
            quantized = ggml_roundtrip(rows.reshape(-1, rows.shape[-1]), type_name, None).reshape(rows.shape)
            change = _first(prefix.module(quantized, *rest, **kwargs)) - reference
            squares.append(float((change.double() ** 2).sum()))
    scale = eps_tokens / (reference.numel() // reference.shape[-1])
    return {target: TensorStats(np.sqrt(np.array(squares) * scale))}


def output_errors(ckpt: Checkpoint, model, final_hidden: np.ndarray, eps_positions: np.ndarray,
                  types: Sequence[str], eps_tokens: int, device: torch.device, hessian_tokens: int = 0
                  ) -> dict[str, TensorStats]:
    """The output head's importance (the final norm's output over every calibration token), its error at each
    of ``types`` (the module docstring) and, with ``hessian_tokens``, its input's Hessian over that many;
    ``final_hidden`` [n_seq, length, H] is the last layer's output."""
    head = "lm_head.weight" if "lm_head.weight" in ckpt.tensors else ckpt.arch.embed_tokens
    target = gguf_name(ckpt, "lm_head.weight")
    norm = getattr(model.model, "norm", None)
    if target is None or norm is None or not types:
        return {}
    with checkpoint_weights(norm, ckpt, "model.norm.", "the final norm's", device):
        flat = final_hidden.reshape(-1, final_hidden.shape[-1])
        with torch.no_grad():
            sums = torch.zeros(flat.shape[1], dtype=torch.float64, device=device)
            gram = Gram(hessian_tokens)
            for first in range(0, flat.shape[0], ROWS):
                normed = norm(torch.from_numpy(np.array(flat[first:first + ROWS])).to(device))
                sums += (normed.double() ** 2).sum(0)
                gram.add(normed)
            importance = (sums / flat.shape[0]).float().cpu().numpy()
            positions = eps_positions[:OUTPUT_TOKENS]
            h = torch.from_numpy(np.array(flat[positions])).to(device)
            n = norm(h)
            weight = torch.from_numpy(np.ascontiguousarray(ckpt.load(head), dtype=np.float32)).to(device)
            gain = getattr(norm, "weight", None)
            gain = torch.ones(h.shape[1], device=device) if gain is None else gain
            spread = float(((weight * gain).double() ** 2).sum()) / h.shape[1]  # |W diag(g)|_F^2 / H
            rms2 = (h.double() ** 2).mean(1)
            squares = []
            for type_name in types:
                dz = n @ (ggml_roundtrip(weight, type_name, importance) - weight).T
                squares.append(float(((dz.double() ** 2).sum(1) * rms2).sum()) / spread)
    return {target: TensorStats(np.sqrt(np.array(squares) * eps_tokens / len(positions)), importance, gram.reader())}
