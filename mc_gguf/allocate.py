"""Bit allocation over experts: an integer program solved with HiGHS (scipy.optimize.milp).

Every expert e gets exactly one candidate type b. The cost of a choice is the
expert's significance times its quantization error,

    c(e, b) = phi_e^alpha * w_e^beta * eps(e, b)^gamma

(phi: activation frequency, w: summed routing weight, eps: output error of
the expert at type b; the MC authors' code uses alpha = 1, beta = 1.5,
gamma = 1, the paper writes gamma = 2). The program minimises the summed cost
subject to a budget in average bits per weight, counted in real bytes (a
type's bits per weight include its scales):

    global (default): sum_e n_e * bpw_b * x(e, b) <= B * sum_e n_e
    per layer (the paper's form): the same inequality within every layer, and
        in every layer at least one expert at a type below B and one at or above it,
        where both kinds of type exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from mc_gguf.errors import McGgufError


class InfeasibleBudgetError(McGgufError):
    """No assignment of the candidate types meets the budget."""


@dataclass
class AllocationProblem:
    """Costs and sizes of every (expert, type) choice; experts are numbered 0 .. E-1 across layers."""

    cost: np.ndarray             # [E, T] c(e, b)
    bits_per_weight: np.ndarray  # [T]
    n_weights: np.ndarray        # [E] weights of each expert (all its projections)
    layer_of: np.ndarray         # [E] layer index of each expert


# The MC authors' exponents (their code; the paper writes gamma = 2): `mc-gguf allocate`'s default.
AUTHORS_COST = {"alpha": 1.0, "beta": 1.5, "gamma": 1.0}


def significance_cost(phi: np.ndarray, w: np.ndarray, eps: np.ndarray,
                      alpha: float = AUTHORS_COST["alpha"], beta: float = AUTHORS_COST["beta"],
                      gamma: float = AUTHORS_COST["gamma"]) -> np.ndarray:
    """c(e, b) = phi_e^alpha * w_e^beta * eps(e, b)^gamma, for phi, w [E] and eps [E, T]."""
    return (phi ** alpha * w ** beta)[:, None] * eps ** gamma


def check_budget(budget_bpw: float, bits_per_weight: Sequence[float]) -> tuple[float, float]:
    """The feasible range (smallest, largest type), or InfeasibleBudgetError when the budget is outside it."""
    lo, hi = float(np.min(bits_per_weight)), float(np.max(bits_per_weight))
    if not lo <= budget_bpw <= hi:
        where = "below the smallest" if budget_bpw < lo else "above the largest"
        raise InfeasibleBudgetError(
            f"a budget of {budget_bpw:.3f} bits per weight is {where} candidate type; "
            f"feasible budgets are {lo:.3f} to {hi:.3f}")
    return lo, hi


def allocate(problem: AllocationProblem, budget_bpw: float, per_layer: bool = False) -> np.ndarray:
    """The optimal type index of every expert [E] (int), or InfeasibleBudgetError naming the feasible range."""
    cost = np.asarray(problem.cost, dtype=np.float64)
    n_experts, n_types = cost.shape
    bpw = np.asarray(problem.bits_per_weight, dtype=np.float64)
    n_weights = np.asarray(problem.n_weights, dtype=np.float64)
    lo, hi = check_budget(budget_bpw, bpw)

    # x is [E, T] flattened row-major; one type per expert
    one_type = LinearConstraint(np.kron(np.eye(n_experts), np.ones(n_types)), 1, 1)
    constraints = [one_type]
    groups = [np.flatnonzero(problem.layer_of == layer) for layer in np.unique(problem.layer_of)] \
        if per_layer else [np.arange(n_experts)]
    for members in groups:
        row = np.zeros((n_experts, n_types))
        row[members] = n_weights[members, None] * bpw[None, :]
        constraints.append(LinearConstraint(row.ravel(), -np.inf, budget_bpw * n_weights[members].sum()))
        if per_layer:
            for side in (bpw < budget_bpw, bpw >= budget_bpw):
                if side.any() and (~side).any():
                    at_least = np.zeros((n_experts, n_types))
                    at_least[np.ix_(members, np.flatnonzero(side))] = 1.0
                    constraints.append(LinearConstraint(at_least.ravel(), 1, np.inf))

    result = milp(c=cost.ravel(), constraints=constraints, integrality=np.ones(cost.size),
                  bounds=Bounds(0, 1))
    if result.status == 2 or result.x is None:
        raise InfeasibleBudgetError(
            f"no assignment meets {budget_bpw:.3f} bits per weight"
            + (" in every layer with one expert below and one at or above the budget" if per_layer else "")
            + f"; feasible budgets are {lo:.3f} to {hi:.3f}")
    if not result.success:
        raise McGgufError(f"the integer program did not solve: {result.message}")
    return np.round(result.x).reshape(n_experts, n_types).argmax(axis=1)


def average_bits(problem: AllocationProblem, choice: Sequence[int]) -> float:
    n = np.asarray(problem.n_weights, dtype=np.float64)
    return float((n * np.asarray(problem.bits_per_weight)[np.asarray(choice)]).sum() / n.sum())
