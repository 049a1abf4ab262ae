"""Per-layer thresholds by measured sensitivity: the integer program's choice against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mc_gguf.prune.budget import LayerOptions, choose_options, layer_options, thresholds_by_sensitivity
from mc_gguf.prune.rule import thresholds_for_skip_share


def predicted_cost(ratios, costs, mu) -> float:
    return sum(float(c[r < m].sum()) / len(r) for r, c, m in zip(ratios, costs, mu))


def skipped_share(ratios, mu, n_used=2) -> float:
    return float(np.mean([np.mean(r < m) for r, m in zip(ratios, mu)])) * (n_used - 1) / n_used


@pytest.mark.parametrize("seed", range(4))
def test_the_cheapest_options_reaching_the_share_are_chosen(seed):
    rng = np.random.default_rng(seed)
    options = []
    for _ in range(3):
        share = np.sort(np.concatenate([[0.0], rng.uniform(0, 0.5, 5)]))
        options.append(LayerOptions(mu=np.linspace(0, 1, 6), share=share,
                                    cost=np.cumsum(rng.uniform(0, 1, 6)) * (share > 0)))
    target = 0.2
    best = min((sum(o.cost[g] for o, g in zip(options, combo)), combo)
               for combo in itertools.product(range(6), repeat=3)
               if np.mean([o.share[g] for o, g in zip(options, combo)]) >= target)
    chosen = choose_options(options, target)
    assert sum(o.cost[g] for o, g in zip(options, chosen)) == pytest.approx(best[0])
    assert np.mean([o.share[g] for o, g in zip(options, chosen)]) >= target - 1e-12


def test_options_count_the_slots_and_costs_below_each_threshold():
    rng = np.random.default_rng(0)
    ratios, costs = rng.uniform(size=(1000, 1)), rng.uniform(size=(1000, 1))
    options = layer_options(ratios, costs)
    for mu, share, cost in zip(options.mu, options.share, options.cost):
        below = ratios[:, 0] < mu
        assert share == pytest.approx(below.mean() / 2)
        assert cost == pytest.approx(costs[below, 0].sum() / 1000)


def test_sensitive_layers_skip_less_and_the_total_costs_less_than_the_quantile_rule():
    rng = np.random.default_rng(1)
    ratios = [rng.uniform(size=(4000, 1)) for _ in range(4)]
    # layer 0's skips cost ten times the others'
    costs = [rng.uniform(size=(4000, 1)) * (10.0 if il == 0 else 1.0) for il in range(4)]
    target = 0.25
    mu = thresholds_by_sensitivity(ratios, costs, target, n_used=2)
    quantile = thresholds_for_skip_share([r[:, 0] for r in ratios], target, n_used=2)
    assert skipped_share(ratios, mu) >= target - 1e-3
    shares = [np.mean(r < m) for r, m in zip(ratios, mu)]
    assert shares[0] < min(shares[1:])
    assert predicted_cost(ratios, costs, mu) < 0.9 * predicted_cost(ratios, costs, quantile)


def test_no_skip_share_means_no_thresholds():
    assert thresholds_by_sensitivity([np.ones((5, 1))] * 3, [np.ones((5, 1))] * 3, 0.0, n_used=2) == [0.0] * 3
