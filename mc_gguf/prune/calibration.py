"""Per-layer ODP thresholds: from calibration statistics, or measured on a text and written into a GGUF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from mc_gguf.atomic import check_output_path
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.errors import CheckpointError, GGUFFileError
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.edit import field_value, float_array, float_value, open_gguf, rewrite_metadata
from mc_gguf.prune import rule as pruning


def router_top2_ratios(model_dir: str | Path, text: str, *, n_tokens: int = 8192, seq_len: int = 512,
                       progress: bool = True) -> list[np.ndarray]:
    """w_1 / w_0 of every calibration token in every layer, from transformers' router logits.

    The text is tokenized once and cut into sequences of ``seq_len`` tokens (each
    starting with BOS), as many as ``n_tokens`` allows.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mc_gguf.hf.checkpoint import open_checkpoint

    open_checkpoint(model_dir)  # clear errors for a bad folder before transformers reads it
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    body = seq_len - 1
    n_seq = min(len(ids) // body, max(1, n_tokens // seq_len))
    if n_seq == 0:
        raise CheckpointError(f"the calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    per_layer: list[list[np.ndarray]] = [[] for _ in model.model.layers]
    with torch.no_grad():
        for s in tqdm(range(n_seq), desc="router statistics", unit="seq", disable=not progress):
            chunk = [tokenizer.bos_token_id] + ids[s * body:(s + 1) * body]
            out = model(torch.tensor([chunk]), output_router_logits=True)
            for il, logits in enumerate(out.router_logits):
                probs = torch.softmax(logits.float(), dim=-1).numpy()
                per_layer[il].append(pruning.top2_ratios(probs))
    return [np.concatenate(r) for r in per_layer]


def write_odp_metadata(gguf_in: str | Path, gguf_out: str | Path, mu: list[float],
                       protect_ratio: float = pruning.DEFAULT_PROTECT_RATIO) -> Path:
    """Set mc.odp.mu and mc.odp.protect_ratio (tensors are copied unchanged)."""
    pruning.validate_params(mu, protect_ratio)
    return rewrite_metadata(gguf_in, gguf_out, {
        keys.ODP_MU: float_array(mu),
        keys.ODP_PROTECT_RATIO: float_value(protect_ratio),
    })


def calibrate_odp(model_dir: str | Path, text: str, gguf_in: str | Path, gguf_out: str | Path, skip_share: float, *,
                  n_tokens: int = 8192, seq_len: int = 512,
                  protect_ratio: float = pruning.DEFAULT_PROTECT_RATIO,
                  progress: bool = True) -> tuple[list[float], list[np.ndarray]]:
    """Per-layer mu for ``skip_share`` of the slots on ``text``, written into ``gguf_out``.

    Returns the thresholds and the per-layer w1/w0 ratios they came from.
    """
    n_used = _check_inputs(model_dir, gguf_in, gguf_out, skip_share, protect_ratio)
    ratios = router_top2_ratios(model_dir, text, n_tokens=n_tokens, seq_len=seq_len, progress=progress)
    mu = pruning.thresholds_for_skip_share(ratios, skip_share, n_used)
    write_odp_metadata(gguf_in, gguf_out, mu, protect_ratio)
    return mu, ratios


def _check_inputs(model_dir: str | Path, gguf_in: str | Path, gguf_out: str | Path, skip_share: float,
                  protect_ratio: float) -> int:
    """Everything that can be wrong, checked before the model pass; returns the experts per token."""
    from mc_gguf.hf.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    pruning.check_skip_share(skip_share, ckpt.n_experts_used)
    pruning.validate_params([], protect_ratio)
    check_output_path(gguf_out)
    reader = open_gguf(gguf_in)
    arch = field_value(reader, "general.architecture")
    n_layers = field_value(reader, f"{arch}.block_count")
    if n_layers != ckpt.n_layers:
        raise GGUFFileError(f"{gguf_in} has {n_layers} layers, the model in {model_dir} {ckpt.n_layers}: "
                            "is it a GGUF of this model?")
    return ckpt.n_experts_used


def odp_from_stats(stats: CalibrationStats, skip_share: float,
                   protect_ratio: float = pruning.DEFAULT_PROTECT_RATIO) -> pruning.OdpParams:
    """Per-layer mu that skip ``skip_share`` of the expert slots on the calibration tokens."""
    ratios = [layer.top_ratio[:, 0] for layer in stats.layers]
    mu = pruning.thresholds_for_skip_share(ratios, skip_share, n_used=int(stats.info["n_expert_used"]))
    return pruning.OdpParams(mu, protect_ratio)
