"""The integer program finds the same optimum as brute force over every assignment."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mc_gguf.allocate import AllocationProblem, InfeasibleBudgetError, allocate, average_bits, significance_cost

BPW = np.array([2.0625, 2.5625, 3.4375])  # IQ2_XXS, Q2_K, Q3_K


def random_problem(seed: int, n_layers: int = 2, n_experts: int = 4) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    total = n_layers * n_experts
    phi, w = rng.dirichlet(np.ones(total)), rng.dirichlet(np.ones(total))
    # error falls with bits, with expert-specific sensitivity
    eps = rng.uniform(0.5, 2.0, (total, 1)) * np.exp(-1.2 * BPW)[None, :] * rng.uniform(0.8, 1.2, (total, len(BPW)))
    return AllocationProblem(cost=significance_cost(phi, w, eps), bits_per_weight=BPW,
                             n_weights=rng.choice([1000, 2000], total), layer_of=np.repeat(np.arange(n_layers), n_experts))


def brute_force(problem: AllocationProblem, budget: float, per_layer: bool) -> float:
    best = np.inf
    n_experts = len(problem.n_weights)
    for choice in itertools.product(range(len(BPW)), repeat=n_experts):
        choice = np.array(choice)
        groups = [problem.layer_of == layer for layer in np.unique(problem.layer_of)] if per_layer \
            else [np.ones(n_experts, bool)]
        ok = True
        for g in groups:
            n = problem.n_weights[g]
            if (n * BPW[choice[g]]).sum() > budget * n.sum() + 1e-9:
                ok = False
            if per_layer and not ((BPW[choice[g]] < budget).any() and (BPW[choice[g]] >= budget).any()):
                ok = False
        if ok:
            best = min(best, problem.cost[np.arange(n_experts), choice].sum())
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("per_layer", [False, True])
def test_milp_matches_brute_force(seed, per_layer):
    problem = random_problem(seed)
    budget = 2.5
    choice = allocate(problem, budget, per_layer=per_layer)
    got = problem.cost[np.arange(len(choice)), choice].sum()
    assert got == pytest.approx(brute_force(problem, budget, per_layer), rel=1e-9)
    assert average_bits(problem, choice) <= budget + 1e-9


@pytest.mark.parametrize("budget, where", [(2.0, "below the smallest"), (3.5, "above the largest")])
def test_budget_outside_the_types_names_the_feasible_range(budget, where):
    with pytest.raises(InfeasibleBudgetError, match=f"{where} candidate type; feasible budgets are 2.062 to 3.438"):
        allocate(random_problem(0), budget)


def test_budget_at_the_largest_type_gives_every_expert_the_largest():
    choice = allocate(random_problem(1), float(BPW.max()))
    assert (choice == len(BPW) - 1).all()
