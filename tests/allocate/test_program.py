"""The integer program finds the same optimum as brute force over every assignment."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mc_gguf.allocate.cost import significance_cost
from mc_gguf.allocate.program import AllocationProblem, InfeasibleBudgetError, average_bits, solve

BPW = np.array([2.0625, 2.5625, 3.4375])  # IQ2_XXS, Q2_K, Q3_K


def random_problem(seed: int, n_layers: int = 2, n_experts: int = 4) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    total = n_layers * n_experts
    phi, w = rng.dirichlet(np.ones(total)), rng.dirichlet(np.ones(total))
    # error falls with bits, with expert-specific sensitivity
    eps = rng.uniform(0.5, 2.0, (total, 1)) * np.exp(-1.2 * BPW)[None, :] * rng.uniform(0.8, 1.2, (total, len(BPW)))
    return AllocationProblem(cost=significance_cost(phi, w, eps), bits_per_weight=BPW,
                             n_weights=rng.choice([1000, 2000], total), layer_of=np.repeat(np.arange(n_layers), n_experts))


def brute_force(problem: AllocationProblem, budget: float, per_layer: bool, max_types: int | None = None) -> float:
    best = np.inf
    n_experts = len(problem.n_weights)
    for choice in itertools.product(range(len(BPW)), repeat=n_experts):
        choice = np.array(choice)
        groups = [problem.layer_of == layer for layer in np.unique(problem.layer_of)] if per_layer \
            else [np.ones(n_experts, bool)]
        ok = max_types is None or all(len(set(choice[problem.tensor_of == s])) <= max_types
                                      for s in np.unique(problem.tensor_of))
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
    choice = solve(problem, budget, per_layer=per_layer)
    got = problem.cost[np.arange(len(choice)), choice].sum()
    assert got == pytest.approx(brute_force(problem, budget, per_layer), rel=1e-9)
    assert average_bits(problem, choice) <= budget + 1e-9


@pytest.mark.parametrize("budget, where", [(2.0, "below the smallest"), (3.5, "above the largest")])
def test_budget_outside_the_types_names_the_feasible_range(budget, where):
    with pytest.raises(InfeasibleBudgetError, match=f"{where} candidate type; feasible budgets are 2.062 to 3.438"):
        solve(random_problem(0), budget)


def test_budget_at_the_largest_type_gives_every_expert_the_largest():
    choice = solve(random_problem(1), float(BPW.max()))
    assert (choice == len(BPW) - 1).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_types", [1, 2])
def test_bounded_types_per_tensor_match_brute_force(seed, max_types):
    # two tensors per layer of two experts each (as gate+up and down would be with --per-projection)
    problem = random_problem(seed)
    problem.tensor_of = np.repeat(np.arange(4), 2)
    budget = 2.6
    choice = solve(problem, budget, max_types=max_types)
    for tensor in range(4):
        assert len(set(choice[problem.tensor_of == tensor])) <= max_types
    got = problem.cost[np.arange(len(choice)), choice].sum()
    assert got == pytest.approx(brute_force(problem, budget, False, max_types), rel=1e-9)
    assert average_bits(problem, choice) <= budget + 1e-9


def test_the_bound_binds():
    """Where the free optimum mixes three types in a tensor, the bound of two must cost something."""
    for seed in range(50):
        problem = random_problem(seed, n_layers=1, n_experts=6)
        problem.tensor_of = np.zeros(6, dtype=int)
        free = solve(problem, 2.6)
        if len(set(free)) == 3:
            break
    else:
        pytest.fail("no seed gives a free optimum of three types")
    bounded = solve(problem, 2.6, max_types=2)
    assert len(set(bounded)) <= 2
    assert problem.cost[np.arange(6), bounded].sum() > problem.cost[np.arange(6), free].sum()


def test_bounded_types_conflicting_with_per_layer_is_infeasible():
    problem = random_problem(0)
    problem.tensor_of = problem.layer_of
    with pytest.raises(InfeasibleBudgetError, match="with at most 1 type per tensor"):
        solve(problem, 2.5, per_layer=True, max_types=1)


@pytest.mark.parametrize("seed", range(4))
def test_choices_limited_to_their_own_types_match_brute_force(seed):
    """``allowed``: some choices (the other tensors) take only some types; the optimum is brute force's over the
    assignments that respect it, and the feasible range counts only the allowed types."""
    problem = random_problem(seed)
    allowed = np.ones(problem.cost.shape, dtype=bool)
    allowed[:3, 0] = False   # these may not take the smallest type
    allowed[3:5, 2] = False  # nor these the largest
    problem.allowed = allowed
    budget = 2.6
    choice = solve(problem, budget)
    assert allowed[np.arange(len(choice)), choice].all()
    best = np.inf
    n = problem.n_weights
    for assignment in itertools.product(range(len(BPW)), repeat=len(n)):
        assignment = np.array(assignment)
        if allowed[np.arange(len(n)), assignment].all() and (n * BPW[assignment]).sum() <= budget * n.sum() + 1e-9:
            best = min(best, problem.cost[np.arange(len(n)), assignment].sum())
    assert problem.cost[np.arange(len(choice)), choice].sum() == pytest.approx(best, rel=1e-9)
    low = (n[:3] * BPW[1]).sum() + (n[3:] * BPW[0]).sum()
    with pytest.raises(InfeasibleBudgetError, match=f"feasible budgets are {low / n.sum():.3f}"):
        solve(problem, 2.0)
