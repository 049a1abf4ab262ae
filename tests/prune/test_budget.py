"""Thresholds by measured sensitivity: the integer program's (per layer) and the price sweep's (per expert) choices
against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mc_gguf.prune.budget import (
    LayerOptions,
    choose_by_price,
    choose_options,
    layer_options,
    thresholds_by_sensitivity,
    thresholds_per_expert,
)
from mc_gguf.prune.rule import thresholds_for_skip_share


def predicted_cost(ratios, costs, mu) -> float:
    return sum(float(c[r < m].sum()) / len(r) for r, c, m in zip(ratios, costs, mu))


def skipped_share(ratios, mu, n_used=2) -> float:
    return float(np.mean([np.mean(r < m) for r, m in zip(ratios, mu)])) * (n_used - 1) / n_used


def random_options(rng, n_groups: int, n_choices: int, max_share: float) -> list[LayerOptions]:
    """Per group: the choice of no skipping (share and cost 0), then random shares up to ``max_share`` at
    costs rising with the share."""
    options = []
    for _ in range(n_groups):
        share = np.sort(np.concatenate([[0.0], rng.uniform(0, max_share, n_choices - 1)]))
        options.append(LayerOptions(mu=np.linspace(0, 1, n_choices), share=share,
                                    cost=np.cumsum(rng.uniform(0, 1, n_choices)) * (share > 0)))
    return options


@pytest.mark.parametrize("seed", range(4))
def test_the_cheapest_options_reaching_the_share_are_chosen(seed):
    options = random_options(np.random.default_rng(seed), n_groups=3, n_choices=6, max_share=0.5)
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


@pytest.mark.parametrize("seed", range(4))
def test_the_price_sweep_is_cheapest_for_the_share_it_reaches(seed):
    """Every choice of the sweep is optimal for the share it reaches (the lower convex hull): brute force over
    all combinations of 4 groups (2 layers x 2 experts) finds none cheaper with at least that share."""
    options = random_options(np.random.default_rng(seed), n_groups=4, n_choices=5, max_share=0.25)
    target = 0.15
    chosen = choose_by_price(options, target, n_layers=2)
    reached = sum(o.share[g] for o, g in zip(options, chosen)) / 2
    assert reached >= target - 1e-12
    cost = sum(o.cost[g] for o, g in zip(options, chosen))
    best = min(sum(o.cost[g] for o, g in zip(options, combo))
               for combo in itertools.product(range(5), repeat=4)
               if sum(o.share[g] for o, g in zip(options, combo)) / 2 >= reached - 1e-12)
    assert cost == pytest.approx(best)


def test_per_expert_thresholds_skip_the_cheap_experts_and_cost_less_than_per_layer():
    rng = np.random.default_rng(2)
    n_layers, n_experts, n_tokens = 3, 4, 4000
    ratios = [rng.uniform(size=(n_tokens, 1)) for _ in range(n_layers)]
    experts = [rng.integers(0, n_experts, size=(n_tokens, 1)) for _ in range(n_layers)]
    # a slot costs more the larger its weight, and expert 0's ten times the others' in every layer
    costs = [r ** 2 * rng.uniform(size=(n_tokens, 1)) * np.where(e == 0, 10.0, 1.0) for r, e in zip(ratios, experts)]
    target = 0.25
    mu = thresholds_per_expert(ratios, costs, experts, n_experts, target, n_used=2)
    slot_mu = [np.asarray(row)[e] for row, e in zip(mu, experts)]
    assert skipped_share(ratios, slot_mu) >= target - 1e-3
    for r, e, m in zip(ratios, experts, slot_mu):
        shares = [np.mean(r[e == x] < m[e == x]) for x in range(n_experts)]
        assert shares[0] < min(shares[1:])
    per_layer = thresholds_by_sensitivity(ratios, costs, target, n_used=2)
    assert predicted_cost(ratios, costs, slot_mu) < 0.9 * predicted_cost(ratios, costs, per_layer)
