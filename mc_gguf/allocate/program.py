"""The bit-allocation integer program, solved with HiGHS (scipy.optimize.milp).

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

Optionally, at most K distinct types among the experts stored in one tensor
(a layer and projection): binary z(s, b) >= x(e, b) for the experts e of
tensor s, and sum_b z(s, b) <= K. In the per-expert layout each distinct type
is a group: on the CPU one op computes all groups of a projection, but GPU
backends run each group as its own ops, so fewer types decode faster there;
K = 1 is llama.cpp's one type per tensor.

A choice may be limited to some of the types (``allowed``): the other
tensors (attention, embeddings, output head) have candidates of their own
beside the experts'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from mc_gguf.errors import McGgufError


class InfeasibleBudgetError(McGgufError):
    """No assignment of the candidate types meets the budget."""


@dataclass
class AllocationProblem:
    """Costs and sizes of every (expert, type) choice; experts are numbered 0 .. E-1 across layers."""

    cost: np.ndarray             # [E, T] c(e, b)
    # [T], or [E, T] where a choice's rows are stored in a fallback type (types.stored_type)
    bits_per_weight: np.ndarray
    n_weights: np.ndarray        # [E] weights of each expert (all its projections)
    layer_of: np.ndarray         # [E] layer index of each expert
    tensor_of: np.ndarray | None = None  # [E] the tensor (layer, projections) each choice is stored in
    # [E, T] bool: the types each choice may take (experts and the other tensors have their own candidates);
    # None: every type
    allowed: np.ndarray | None = None

    def allowed_mask(self) -> np.ndarray:
        return np.ones(np.shape(self.cost), dtype=bool) if self.allowed is None else np.asarray(self.allowed, bool)

    def smallest_choice(self) -> np.ndarray:
        """Every choice at its smallest allowed type (fewest bits) [E]."""
        bpw = np.broadcast_to(np.asarray(self.bits_per_weight, dtype=np.float64), np.shape(self.cost))
        return np.where(self.allowed_mask(), bpw, np.inf).argmin(axis=1)


def feasible_range(bits_per_weight: Sequence[float] | np.ndarray, n_weights: np.ndarray | None = None,
                   allowed: np.ndarray | None = None) -> tuple[float, float]:
    """Average bits per weight with every choice at its smallest type, and at its largest.
    ``bits_per_weight`` [T], or [E, T] with the choices' ``n_weights`` [E] and the types they may take."""
    bpw = np.asarray(bits_per_weight, dtype=np.float64)
    if bpw.ndim == 1:
        return float(bpw.min()), float(bpw.max())
    n = np.asarray(n_weights, dtype=np.float64)
    ok = np.ones(bpw.shape, dtype=bool) if allowed is None else np.asarray(allowed, bool)
    least, most = np.where(ok, bpw, np.inf).min(axis=1), np.where(ok, bpw, -np.inf).max(axis=1)
    return float((n * least).sum() / n.sum()), float((n * most).sum() / n.sum())


def check_budget(budget_bpw: float, bits_per_weight: Sequence[float] | np.ndarray,
                 n_weights: np.ndarray | None = None, allowed: np.ndarray | None = None) -> tuple[float, float]:
    """feasible_range, or InfeasibleBudgetError when the budget is outside it."""
    lo, hi = feasible_range(bits_per_weight, n_weights, allowed)
    if not lo <= budget_bpw <= hi:
        where = "below the smallest" if budget_bpw < lo else "above the largest"
        raise InfeasibleBudgetError(
            f"a budget of {budget_bpw:.3f} bits per weight is {where} candidate type; "
            f"feasible budgets are {lo:.3f} to {hi:.3f}")
    return lo, hi


def solve(problem: AllocationProblem, budget_bpw: float, per_layer: bool = False,
             max_types: int | None = None) -> np.ndarray:
    """The optimal type index of every expert [E] (int), or InfeasibleBudgetError naming the feasible range.

    ``max_types`` bounds the distinct types per tensor (``problem.tensor_of``).
    """
    cost = np.asarray(problem.cost, dtype=np.float64)
    n_experts, n_types = cost.shape
    n_weights = np.asarray(problem.n_weights, dtype=np.float64)
    bpw = np.broadcast_to(np.asarray(problem.bits_per_weight, dtype=np.float64), cost.shape)
    allowed = problem.allowed_mask()
    cost = np.where(allowed, cost, 0.0)
    lo, hi = check_budget(budget_bpw, bpw, n_weights, allowed)
    if max_types is not None and max_types < 1:
        raise McGgufError(f"at most {max_types} types per tensor: the bound must be at least 1")
    limit_types = max_types is not None and max_types < n_types
    if limit_types and problem.tensor_of is None:
        raise McGgufError("bounding the types per tensor needs the tensor of every expert (tensor_of)")
    tensors = np.unique(problem.tensor_of) if limit_types else np.array([], dtype=int)

    # variables: x [E, T] (expert e at type b), then z [S, T] (type b used in tensor s), row-major;
    # sparse, since a model of many experts and types has a large but thin system
    n_x, n_z = n_experts * n_types, len(tensors) * n_types

    def rows(x_part, z_part=None) -> sparse.csr_array:
        x_part = sparse.csr_array(x_part)
        z_part = sparse.csr_array((x_part.shape[0], n_z)) if z_part is None else z_part
        return sparse.hstack([x_part, z_part], format="csr")

    one_type = sparse.kron(sparse.eye_array(n_experts), np.ones((1, n_types)))
    constraints = [LinearConstraint(rows(one_type), 1, 1)]
    groups = [np.flatnonzero(problem.layer_of == layer) for layer in np.unique(problem.layer_of)] \
        if per_layer else [np.arange(n_experts)]
    for members in groups:
        row = np.zeros((n_experts, n_types))
        row[members] = n_weights[members, None] * bpw[members]
        constraints.append(LinearConstraint(rows(row.reshape(1, -1)), -np.inf, budget_bpw * n_weights[members].sum()))
        if per_layer:
            for side in (bpw < budget_bpw, bpw >= budget_bpw):
                if side[members].any() and (~side[members]).any():
                    at_least = np.zeros((n_experts, n_types))
                    at_least[members] = side[members]
                    constraints.append(LinearConstraint(rows(at_least.reshape(1, -1)), 1, np.inf))
    if limit_types:
        # x(e, b) - z(s(e), b) <= 0: an expert's type is one its tensor uses
        slot = np.searchsorted(tensors, problem.tensor_of)
        z_column = (slot[:, None] * n_types + np.arange(n_types)[None, :]).ravel()
        z_link = sparse.csr_array((-np.ones(n_x), (np.arange(n_x), z_column)), shape=(n_x, n_z))
        constraints.append(LinearConstraint(rows(sparse.eye_array(n_x, format="csr"), z_link), -np.inf, 0))
        per_tensor = sparse.kron(sparse.eye_array(len(tensors)), np.ones((1, n_types)), format="csr")
        constraints.append(LinearConstraint(rows(sparse.csr_array((len(tensors), n_x)), per_tensor), 0, max_types))

    result = milp(c=np.concatenate([cost.ravel(), np.zeros(n_z)]), constraints=constraints,
                  integrality=np.ones(n_x + n_z),
                  bounds=Bounds(0, np.concatenate([allowed.ravel().astype(np.float64), np.ones(n_z)])))
    if result.status == 2 or result.x is None:
        raise InfeasibleBudgetError(
            f"no assignment meets {budget_bpw:.3f} bits per weight"
            + (" in every layer with one expert below and one at or above the budget" if per_layer else "")
            + (f" with at most {max_types} type{'s' if max_types > 1 else ''} per tensor" if limit_types else "")
            + f"; feasible budgets are {lo:.3f} to {hi:.3f}"
            + (" without that bound" if limit_types else ""))
    if not result.success:
        raise McGgufError(f"the integer program did not solve: {result.message}")
    return np.round(result.x[:n_x]).reshape(n_experts, n_types).argmax(axis=1)


def average_bits(problem: AllocationProblem, choice: Sequence[int]) -> float:
    n = np.asarray(problem.n_weights, dtype=np.float64)
    bpw = np.broadcast_to(np.asarray(problem.bits_per_weight, dtype=np.float64), np.shape(problem.cost))
    return float((n * bpw[np.arange(len(n)), np.asarray(choice)]).sum() / n.sum())
