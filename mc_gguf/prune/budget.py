"""Per-layer ODP thresholds by measured sensitivity: a skip share reached at the least predicted cost.

The quantile rule (rule.thresholds_for_skip_share) skips the same share of
slots in every layer, though layers differ in how much a skipped slot moves
the model. Here the calibration measured, for every token and slot i >= 1,
the squared change of the MoE block output if that slot alone were skipped,
relative to the token's hidden state (calibrate/moe.py ``skip_energy``,
stored as ``skip_cost``). A threshold mu on w_i / w_0 skips the slots whose
ratio is below it; its predicted cost is the sum of their costs (skips are
taken as adding up). For every layer a grid of thresholds (halfway between its
ratios) gives (share of slots skipped, cost) pairs; an integer program
(HiGHS, as the bit allocation) picks one per layer so that the share over
all layers reaches the target at the least summed cost.

Per expert (the default, ``thresholds_per_expert``): experts differ too in
what dropping one of their slots costs, so each (layer, expert) gets its own
grid over the ratios of the slots routed to it, each option's share counted
over the layer's slots, so that a layer's experts add up to the layer. With
layers x experts groups (6144 for Qwen3-MoE's 48 x 128) the choice is a
Lagrangian sweep instead of the integer program: for a price lambda of a
skipped share each group takes its option of least cost - lambda x share,
and a bisection on lambda finds the least price whose choices reach the
target (every choice on the lower convex hull of its group's options, which
the integer program's optimum is at most one option per group away from).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mc_gguf.errors import InvalidValueError
from mc_gguf.prune.rule import check_skip_share

GRID = 64  # thresholds tried per layer: skipping 0, 1/64, ..., all of its slots i >= 1
EXPERT_GRID = 32  # thresholds tried per layer and expert


@dataclass
class LayerOptions:
    """The thresholds a layer may take, with the share of its slots each skips and its predicted cost."""
    mu: np.ndarray     # [G]
    share: np.ndarray  # [G] skipped share of the layer's slots (slot 0 included in the count)
    cost: np.ndarray   # [G] summed skip cost per calibration token


def layer_options(ratios: np.ndarray, costs: np.ndarray, grid: int = GRID) -> LayerOptions:
    """The options of one layer from its tokens' w_i / w_0 [tokens, k-1] and skip costs [tokens, k-1]."""
    ratios = np.asarray(ratios, dtype=np.float64).reshape(len(ratios), -1)
    n_tokens, n_skippable = ratios.shape
    return _options(ratios.ravel(), np.asarray(costs, dtype=np.float64).ravel(), grid,
                    n_slots=n_tokens * (n_skippable + 1), n_tokens=n_tokens)


def _options(ratios: np.ndarray, costs: np.ndarray, grid: int, n_slots: int, n_tokens: int) -> LayerOptions:
    """Thresholds skipping 0, 1/grid, ..., all of ``ratios`` (flat), each halfway between two neighbouring ratios
    (never on one, where float noise in the runtime's weights would decide), with the share of ``n_slots`` each
    skips and the summed cost per token of the slots it skips."""
    order = np.argsort(ratios, kind="stable")
    ordered = ratios[order]
    n = ordered.size
    counts = np.unique(np.round(np.linspace(0, n, grid + 1)).astype(np.int64))[1:-1]  # 0 and n: mu 0 and 1 below
    mu = np.unique(np.concatenate([[0.0], (ordered[counts - 1] + ordered[counts]) / 2, [1.0]]))
    cumulative = np.concatenate([[0.0], np.cumsum(costs[order])])
    skipped = np.searchsorted(ordered, mu, side="left")  # slots with ratio < mu
    return LayerOptions(mu=mu, share=skipped / n_slots, cost=cumulative[skipped] / n_tokens)


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


def thresholds_per_expert(ratios_per_layer: Sequence[np.ndarray], costs_per_layer: Sequence[np.ndarray],
                          experts_per_layer: Sequence[np.ndarray], n_experts: int, target_skip: float,
                          n_used: int) -> list[list[float]]:
    """Per-layer, per-expert mu [layers][experts] skipping about ``target_skip`` of all expert slots at the least
    predicted cost; ``experts_per_layer``: the expert of every ratio's slot [tokens, k-1]."""
    check_skip_share(target_skip, n_used)
    if target_skip == 0:
        return [[0.0] * n_experts for _ in ratios_per_layer]
    groups: list[LayerOptions] = []
    for ratios, costs, experts in zip(ratios_per_layer, costs_per_layer, experts_per_layer):
        ratios = np.asarray(ratios, dtype=np.float64).reshape(len(ratios), -1)
        costs = np.asarray(costs, dtype=np.float64).ravel()
        experts = np.asarray(experts).ravel()
        n_tokens, n_skippable = ratios.shape
        for xid in range(n_experts):
            mine = experts == xid
            groups.append(_options(ratios.ravel()[mine], costs[mine], EXPERT_GRID,
                                   n_slots=n_tokens * (n_skippable + 1), n_tokens=n_tokens))
    chosen = choose_by_price(groups, target_skip, len(ratios_per_layer))
    mu = [float(g.mu[i]) for g, i in zip(groups, chosen)]
    return [mu[first:first + n_experts] for first in range(0, len(mu), n_experts)]


def choose_by_price(options: Sequence[LayerOptions], target_skip: float, n_layers: int, steps: int = 100) -> list[int]:
    """One option per group (shares counted over their layer's slots) reaching a mean share over ``n_layers``
    layers of at least ``target_skip``: each group's least cost - price x share, at the least price (bisection)
    that reaches the target."""
    target_share_sum = target_skip * n_layers
    reachable = sum(float(o.share.max()) for o in options)
    if target_share_sum > reachable + 1e-12:
        raise InvalidValueError(f"a skip share of {target_skip:g} is more than these layers can skip "
                                f"({reachable / n_layers:.3f})")

    def choice(price: float) -> tuple[list[int], float]:
        picks = [int(np.argmin(o.cost - price * o.share)) for o in options]
        return picks, sum(float(o.share[i]) for o, i in zip(options, picks))

    low, high = 0.0, 1.0
    while choice(high)[1] < target_share_sum - 1e-12:
        high *= 2.0
        if high > 1e30:  # every option's cost beaten: take each group's largest share
            return [int(np.argmax(o.share)) for o in options]
    for _ in range(steps):
        middle = (low + high) / 2
        if choice(middle)[1] < target_share_sum - 1e-12:
            low = middle
        else:
            high = middle
    return choice(high)[0]
