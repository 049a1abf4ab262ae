"""Online Dynamic Pruning (ODP): the rule, its GGUF metadata, a transformers reference, and mu calibration.

The rule (../METHOD.md, Stage 2; the runtime's build_moe_ffn does the same):
for token t with top-k router probabilities w_0 >= w_1 >= ... (before top-k
renormalisation), slot i >= 1 is skipped when w_i / w_0 < mu_l; a slot is kept
iff w_i / w_0 >= mu_l, so a ratio exactly at the threshold is kept. The kept
weights are renormalised to sum to 1 (Mixtral's gating). In a sequence of
L > 1 tokens the ceil(rho * L) tokens with the highest importance
||t_j||_1 / (L - j) keep all their experts (t_j: the MoE block's input; this is
what the MC authors' code computes, the paper's attention-weighted form
reduces to it there). A single token (decode) uses the mu rule alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mc_gguf.errors import GGUFFileError

# GGUF keys, read by the patched runtime (patches/0006).
KEY_MU = "mc.odp.mu"                        # float32[block_count], 0 = off for that layer
KEY_MU_ALL = "mc.odp.mu_all"                # float32, one mu for every layer (load-time override)
KEY_PROTECT_RATIO = "mc.odp.protect_ratio"  # float32 rho, default 0.02
KEY_ENABLED = "mc.odp.enabled"              # bool, false turns pruning off (load-time override)

DEFAULT_PROTECT_RATIO = 0.02


@dataclass
class OdpParams:
    """Per-layer thresholds and the protection ratio."""

    mu: list[float]
    protect_ratio: float = DEFAULT_PROTECT_RATIO

    def __post_init__(self) -> None:
        validate_params(self.mu, self.protect_ratio)


def validate_params(mu: Sequence[float], protect_ratio: float, n_layers: int | None = None) -> None:
    """The checks the runtime makes at load time, with the same meaning."""
    if n_layers is not None and len(mu) != n_layers:
        raise GGUFFileError(f"{KEY_MU} has {len(mu)} values but the model has {n_layers} layers")
    for il, value in enumerate(mu):
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise GGUFFileError(f"{KEY_MU}[{il}] = {value} is not in [0, 1]")
    if not math.isfinite(protect_ratio) or not 0.0 <= protect_ratio <= 1.0:
        raise GGUFFileError(f"{KEY_PROTECT_RATIO} = {protect_ratio} is not in [0, 1]")


def keep_mask(top_weights: np.ndarray, mu: float, moe_input: np.ndarray | None, protect_ratio: float) -> np.ndarray:
    """Which slots a sequence computes: bool [L, k] from its top-k probabilities [L, k] (sorted, descending).

    ``moe_input`` [L, hidden] is needed for protection when L > 1.
    """
    keep = top_weights >= mu * top_weights[:, :1]
    n_tokens = top_weights.shape[0]
    n_protect = math.ceil(protect_ratio * n_tokens)
    if n_tokens > 1 and n_protect > 0 and moe_input is not None:
        importance = np.abs(moe_input).sum(-1) / (n_tokens - np.arange(n_tokens))
        kth = np.sort(importance)[::-1][n_protect - 1]
        keep |= (importance >= kth)[:, None]
    return keep


@dataclass
class SlotCounts:
    """Expert slots computed and skipped, per layer."""

    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    @property
    def skipped_share(self) -> float:
        total = sum(self.computed) + sum(self.skipped)
        return sum(self.skipped) / total if total else 0.0


class TransformersOdp:
    """ODP applied to a transformers Mixtral model by replacing each layer's router forward.

    Used as a context manager; counts slots per layer like the runtime does.
    """

    def __init__(self, model, mu: Sequence[float], protect_ratio: float = DEFAULT_PROTECT_RATIO):
        layers = model.model.layers
        validate_params(mu, protect_ratio, len(layers))
        self.model = model
        self.mu = list(mu)
        self.protect_ratio = protect_ratio
        self.counts = SlotCounts([0] * len(layers), [0] * len(layers))
        self._saved = []

    def __enter__(self) -> TransformersOdp:
        for il, layer in enumerate(self.model.model.layers):
            router = layer.mlp.gate
            self._saved.append((router, router.forward))
            router.forward = self._pruning_forward(il, router)
        return self

    def __exit__(self, *exc) -> None:
        for router, forward in self._saved:
            router.forward = forward
        self._saved.clear()

    def _pruning_forward(self, il: int, router):
        import torch
        import torch.nn.functional as F

        def forward(hidden_states):
            hidden = hidden_states.reshape(-1, router.hidden_dim)
            logits = F.linear(hidden, router.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            top_values, top_indices = torch.topk(probs, router.top_k, dim=-1)
            if self.mu[il] > 0.0:
                keep = torch.from_numpy(keep_mask(top_values.detach().numpy(), self.mu[il],
                                                  hidden.detach().float().numpy(), self.protect_ratio))
            else:
                keep = torch.ones_like(top_values, dtype=torch.bool)
            # A pruned slot keeps its expert index with weight 0: its output is multiplied
            # by exactly 0. (An out-of-range "skip" index is not safe: transformers' grouped
            # expert kernels leave such rows uninitialised.)
            top_values = top_values * keep
            top_values = top_values / top_values.sum(dim=-1, keepdim=True)
            kept = int(keep.sum())
            self.counts.computed[il] += kept
            self.counts.skipped[il] += keep.numel() - kept
            return logits, top_values.to(hidden_states.dtype), top_indices

        return forward


def top2_ratios(router_probs: np.ndarray) -> np.ndarray:
    """w_1 / w_0 of every token from its router probabilities [tokens, n_expert]."""
    top = np.sort(router_probs, axis=-1)[:, ::-1]
    return top[:, 1] / top[:, 0]


def thresholds_for_skip_share(ratios_per_layer: Sequence[np.ndarray], target_skip: float, n_used: int = 2) -> list[float]:
    """Per-layer mu so that about ``target_skip`` of all slots are skipped (top-2: the w1/w0 quantile).

    With top-2 routing only slot 1 can be skipped, so a layer skips the share q of its
    tokens whose w1/w0 falls below its q-quantile, i.e. q / 2 of its slots; the same
    q in every layer gives a skip share of q / n_used overall.
    """
    share_of_tokens = target_skip * n_used
    if not 0.0 <= share_of_tokens <= 1.0:
        raise ValueError(f"a skip share of {target_skip} is not reachable with top-{n_used} routing")
    # skipped iff ratio < mu: the q-quantile skips a share q of the tokens
    return [float(np.quantile(ratios, share_of_tokens)) if share_of_tokens > 0 and len(ratios) else 0.0
            for ratios in ratios_per_layer]
