"""Online Dynamic Pruning (ODP): the rule, its parameters, and thresholds for a skip share.

The rule (the MC paper's Online Dynamic Pruning; the runtime's build_moe_ffn does the same):
for token t with top-k router probabilities w_0 >= w_1 >= ... (before top-k
renormalisation), slot i >= 1 is skipped when w_i / w_0 < mu_l; a slot is kept
iff w_i / w_0 >= mu_l, so a ratio exactly at the threshold is kept. The kept
weights are renormalised to sum to 1 (Mixtral's gating), unless the file says not to
(mc.odp.renormalize false: the kept weights stay as the router gave them,
so a skipped slot's share of the output is dropped rather than handed to the
others, which moves the output less where experts disagree; mc-gguf's
default). With per-expert thresholds
(mc.odp.mu_exps) slot i's threshold is the one of its expert, in the layers
whose mu_l is > 0 (mu_l then only turns the layer on). In a sequence of
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

from mc_gguf.errors import GGUFFileError, InvalidValueError
from mc_gguf.gguf_io import keys

DEFAULT_PROTECT_RATIO = 0.02


@dataclass
class OdpParams:
    """Per-layer thresholds, the protection ratio and, optionally, per-expert thresholds [layers][experts]
    that replace mu_l in the layers whose mu_l is > 0."""

    mu: list[float]
    protect_ratio: float = DEFAULT_PROTECT_RATIO
    mu_exps: list[list[float]] | None = None
    renormalize: bool = True   # the runtime's default where a file does not say (the paper's rule)

    def __post_init__(self) -> None:
        validate_params(self.mu, self.protect_ratio, mu_exps=self.mu_exps)

    def slot_thresholds(self, il: int, slot_experts: np.ndarray) -> float | np.ndarray:
        """Layer ``il``'s threshold of every slot, from the slots' experts (any shape): mu_l, or the experts'."""
        if self.mu_exps is None or self.mu[il] <= 0.0:
            return self.mu[il]
        return np.asarray(self.mu_exps[il], dtype=np.float32)[np.asarray(slot_experts)]

    @classmethod
    def per_expert(cls, mu_exps: Sequence[Sequence[float]], protect_ratio: float = DEFAULT_PROTECT_RATIO,
                   renormalize: bool = True) -> OdpParams:
        """Per-expert thresholds; a layer is on when any of them is > 0, with mu_l its smallest positive one (so
        that a runtime without mc.odp.mu_exps, patch level < 12, prunes less than asked, never more)."""
        rows = [[float(m) for m in row] for row in mu_exps]
        return cls([min((m for m in row if m > 0.0), default=0.0) for row in rows], protect_ratio, rows, renormalize)


def odp_metadata(odp: OdpParams) -> dict:
    """The mc.odp.* keys of ``odp`` (gguf-py's MetadataDetails, as rewrite_metadata and GGUFWriter.add_key_value
    take them), in the order they are written."""
    values = {keys.ODP_MU: odp.mu, keys.ODP_PROTECT_RATIO: odp.protect_ratio, keys.ODP_RENORMALIZE: odp.renormalize}
    if odp.mu_exps is not None:
        values[keys.ODP_MU_EXPS] = [m for row in odp.mu_exps for m in row]
    return {name: keys.details(name, value) for name, value in values.items()}


def validate_params(mu: Sequence[float], protect_ratio: float, n_layers: int | None = None,
                    mu_exps: Sequence[Sequence[float]] | None = None, n_experts: int | None = None) -> None:
    """The checks the runtime makes at load time, with the same meaning."""
    if n_layers is not None and len(mu) != n_layers:
        raise GGUFFileError(f"{keys.ODP_MU} has {len(mu)} values but the model has {n_layers} layers")
    for il, value in enumerate(mu):
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise GGUFFileError(f"{keys.ODP_MU}[{il}] = {value} is not in [0, 1]")
    if mu_exps is not None:
        widths = {len(row) for row in mu_exps}
        if len(mu_exps) != len(mu) or len(widths) != 1 or (n_experts is not None and widths != {n_experts}):
            raise GGUFFileError(f"{keys.ODP_MU_EXPS} must hold one threshold per layer and expert "
                                f"({len(mu)} x {n_experts if n_experts is not None else 'experts'})")
        for il, row in enumerate(mu_exps):
            for xid, value in enumerate(row):
                if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                    raise GGUFFileError(f"{keys.ODP_MU_EXPS}[{il}][{xid}] = {value} is not in [0, 1]")
    if not math.isfinite(protect_ratio) or not 0.0 <= protect_ratio <= 1.0:
        raise GGUFFileError(f"{keys.ODP_PROTECT_RATIO} = {protect_ratio} is not in [0, 1]")


def keep_mask(top_weights: np.ndarray, mu: float | np.ndarray, moe_input: np.ndarray | None,
              protect_ratio: float) -> np.ndarray:
    """Which slots a sequence computes: bool [L, k] from its top-k weights [L, k] (in any order: a slot is kept
    when its weight is at least mu times the token's top weight, as the runtime's rule; mu is one threshold or
    one per slot [L, k], OdpParams.slot_thresholds).

    ``moe_input`` [L, hidden] is needed for protection when L > 1.
    """
    keep = top_weights >= mu * top_weights.max(-1, keepdims=True)
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


def top_ratios(router_probs: np.ndarray, n_used: int = 2) -> np.ndarray:
    """w_i / w_0 (i = 1 .. k-1) of every token [tokens, k-1] from its router probabilities [tokens, n_expert]."""
    top = np.sort(router_probs, axis=-1)[:, ::-1]
    return top[:, 1:n_used] / top[:, :1]


def check_skip_share(target_skip: float, n_used: int) -> None:
    """A skip share the rule can reach: slot 0 always runs, so at most (k - 1) / k of the slots."""
    limit = (n_used - 1) / n_used
    if not (math.isfinite(target_skip) and 0.0 <= target_skip <= limit):
        raise InvalidValueError(f"a skip share of {target_skip} is not reachable with top-{n_used} routing: "
                                f"choose one in [0, {limit:g}]")


def thresholds_for_skip_share(ratios_per_layer: Sequence[np.ndarray], target_skip: float, n_used: int = 2) -> list[float]:
    """Per-layer mu so that about ``target_skip`` of all slots are skipped: the same quantile of each
    layer's ratios w_i / w_0 ([tokens] for top-2, or [tokens, k-1]).

    Slot 0 always runs; every other slot is skipped when its ratio is below mu (top-any: a token keeps
    1 to k experts). The q-quantile of a layer's k-1 ratios per token skips a share q of them, i.e.
    q (k-1) / k of its slots; the same q in every layer gives that share overall.
    """
    check_skip_share(target_skip, n_used)
    share_of_ratios = target_skip * n_used / (n_used - 1) if n_used > 1 else 0.0
    # skipped iff ratio < mu: the q-quantile skips a share q of the ratios
    return [float(np.quantile(ratios, share_of_ratios)) if share_of_ratios > 0 and np.size(ratios) else 0.0
            for ratios in ratios_per_layer]
