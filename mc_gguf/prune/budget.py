"""Per-layer ODP thresholds by measured sensitivity: a skip share reached at the least predicted cost.

The quantile rule (rule.thresholds_for_skip_share) skips the same share of
slots in every layer, though layers differ in how much a skipped slot moves
the model. Here the calibration measured, for every token and slot i >= 1,
the squared change of the MoE block output if that slot alone were skipped,
relative to the token's hidden state (calibrate/moe.py ``skip_energy``,
stored as ``skip_cost``). A threshold mu on w_i / w_0 skips the slots whose
ratio is below it; its predicted cost is the sum of their costs (skips are
taken as adding up). For every layer a grid of thresholds (quantiles of its
ratios) gives (share of slots skipped, cost) pairs; an integer program
(HiGHS, as the bit allocation) picks one per layer so that the share over
all layers reaches the target at the least summed cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mc_gguf.errors import InvalidValueError
from mc_gguf.prune.rule import check_skip_share

GRID = 64  # thresholds tried per layer: the ratio quantiles 0, 1/64, ..., 1


@dataclass
class LayerOptions:
    """The thresholds a layer may take, with the share of its slots each skips and its predicted cost."""
    mu: np.ndarray     # [G]
    share: np.ndarray  # [G] skipped share of the layer's slots (slot 0 included in the count)
    cost: np.ndarray   # [G] summed skip cost per calibration token


def layer_options(ratios: np.ndarray, costs: np.ndarray, grid: int = GRID) -> LayerOptions:
    """The options of one layer from its tokens' w_i / w_0 [tokens, k-1] and skip costs [tokens, k-1]."""
    ratios = np.asarray(ratios, dtype=np.float64).reshape(len(ratios), -1)
    costs = np.asarray(costs, dtype=np.float64).reshape(ratios.shape)
    n_tokens, n_skippable = ratios.shape
    flat = ratios.ravel()
    mu = np.unique(np.concatenate([[0.0], np.quantile(flat, np.linspace(0, 1, grid + 1)[1:]), [1.0]]))
    order = np.argsort(flat, kind="stable")
    sorted_ratios = flat[order]
    cumulative = np.concatenate([[0.0], np.cumsum(costs.ravel()[order])])
    skipped = np.searchsorted(sorted_ratios, mu, side="left")  # slots with ratio < mu
    return LayerOptions(mu=mu, share=skipped / (n_tokens * (n_skippable + 1)), cost=cumulative[skipped] / n_tokens)


def choose_options(options: Sequence[LayerOptions], target_skip: float) -> list[int]:
    """One option per layer: the least summed cost whose mean skipped share is at least ``target_skip``."""
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(o.mu) for o in options]
    n = sum(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    one_each = sparse.csr_array((np.ones(n), (np.repeat(np.arange(len(options)), sizes), np.arange(n))),
                                shape=(len(options), n))
    shares = np.concatenate([o.share for o in options])
    reachable = sum(o.share.max() for o in options) / len(options)
    if target_skip > reachable + 1e-12:
        raise InvalidValueError(f"a skip share of {target_skip:g} is more than these layers can skip "
                                f"({reachable:.3f})")
    result = milp(c=np.concatenate([o.cost for o in options]),
                  constraints=[LinearConstraint(one_each, 1, 1),
                               LinearConstraint(shares[None, :] / len(options), min(target_skip, reachable), np.inf)],
                  integrality=np.ones(n), bounds=Bounds(0, 1))
    if result.x is None:
        raise InvalidValueError(f"no per-layer thresholds reach a skip share of {target_skip:g}: {result.message}")
    x = np.round(result.x)
    return [int(np.argmax(x[start:start + size])) for start, size in zip(starts, sizes)]


def thresholds_by_sensitivity(ratios_per_layer: Sequence[np.ndarray], costs_per_layer: Sequence[np.ndarray],
                              target_skip: float, n_used: int) -> list[float]:
    """Per-layer mu skipping about ``target_skip`` of all expert slots at the least predicted cost."""
    check_skip_share(target_skip, n_used)
    if target_skip == 0:
        return [0.0] * len(ratios_per_layer)
    options = [layer_options(r, c) for r, c in zip(ratios_per_layer, costs_per_layer)]
    chosen = choose_options(options, target_skip)
    return [float(o.mu[g]) for o, g in zip(options, chosen)]
