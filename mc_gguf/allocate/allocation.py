"""allocate(stats, bits) -> Plan: the integer program of program.py built from calibration statistics, and its answer.

Steps, each a function below:
1. ``_choices``: one choice per expert (or per expert and projection group,
   or per layer and projection for the stock layout), each with its cost
   c = phi^alpha * w^beta * eps^gamma at every candidate type and its weights;
   with a whole-model budget, ``_tensor_choices``: one per other tensor the
   calibration measured (attention, token_embd, output; calibrate/tensors.py)
   at the tensor types, its cost its error^gamma (phi = w = 1: every token
   reads it), unless --tensor-type fixes its class; every cost multiplied
   by how much the output feels a change where its error is measured,
   where the statistics have the Fisher information (calibrate/fisher.py);
2. ``_expert_budget``: the budget in bits per weight of the choices (a whole-model
   budget has the other tensors' fixed bytes taken off first; a file
   size, ``_fit_size``, the header's too, solving until the file fits);
3. ``program.solve``: the optimal type of every choice;
4. ``_plan``: the choices written out expert by expert, with the predicted
   file size (size.py) and where the inputs came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mc_gguf import __version__
from mc_gguf.allocate.cost import AUTHORS_COST, significance_cost
from mc_gguf.allocate.plan import (LAYOUTS, MAX_BITS, NON_EXPERT_CLASSES, NON_EXPERT_DEFAULTS, SCOPES, Plan,
                                   non_expert_class)
from mc_gguf.allocate.program import AllocationProblem, InfeasibleBudgetError, average_bits, feasible_range, solve
from mc_gguf.allocate.size import layout_tensors, metadata_allowance, predict
from mc_gguf.calibrate.stats import EPS_DOWN, EPS_EXPERT, EPS_GATE_UP, CalibrationStats, Fisher
from mc_gguf.errors import McGgufError
from mc_gguf.ggml.types import quant_type, stored_type
from mc_gguf.gguf_io.layout import PROJECTIONS, is_expert_weight, row_length
from mc_gguf.hf.checkpoint import Checkpoint, open_checkpoint


SIZE_ATTEMPTS = 8  # solves for a file size: each lowers the budget by what the last plan's file was over


@dataclass(frozen=True)
class _Unit:
    """One choice of the integer program: some projections of some experts of one layer."""
    bid: int
    experts: tuple[int, ...]
    projections: tuple[str, ...]
    tensor: str | None = None  # one of the other tensors (its GGUF name) instead of experts
    row_length: int = 0        # that tensor's rows (its fallback types depend on them)


def allocate(stats: CalibrationStats, bits: float | None = None, *, size: int | None = None,
             model_dir: str | Path | None = None,
             layout: str = "per-expert", scope: str = "experts", per_layer: bool = False,
             per_projection: bool = False, types: list[str] | None = None,
             alpha: float = AUTHORS_COST["alpha"], beta: float = AUTHORS_COST["beta"],
             gamma: float = AUTHORS_COST["gamma"], non_expert: dict[str, str] | None = None,
             stats_path: str | None = None, max_types: int | None = None,
             error_scale: dict[str, float] | None = None) -> Plan:
    """Choose every expert's type for an average of ``bits`` bits per weight over ``scope``, or for a file of at
    most ``size`` bytes (a target size, as llama.cpp's PR #15550 proposes: the header, the mc-gguf keys and the
    non-expert tensors at their types are paid first, the experts get the rest).

    ``max_types`` bounds the distinct types (expert groups of the per-expert layout) in
    every layer and projection. ``error_scale`` multiplies the measured errors of some
    types, e.g. by how much the quantizer's tuning lowers them (quantize/tune.py
    tuned_error_ratios), so that bits go where tuning cannot help.
    """
    if layout not in LAYOUTS:
        raise McGgufError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if scope not in SCOPES:
        raise McGgufError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    if (bits is None) == (size is None):
        raise McGgufError("give the budget as bits per weight or as a file size, one of the two")
    if size is not None and per_layer:
        raise McGgufError("--per-layer holds a bits-per-weight budget in every layer: give --bits with it, "
                          "not --size")
    if size is not None:
        scope = "model"  # a file size budgets every tensor
    if per_layer and (layout == "stock" or scope == "model"):
        raise McGgufError("--per-layer reproduces the paper's per-layer expert budget: it needs the per-expert "
                          "layout and the experts scope")
    if not stats.types:
        raise McGgufError("these statistics hold routing only (odp-calibrate's pass measures no quantization "
                          "errors): calibrate with candidate types (mc-gguf calibrate) to allocate bits")
    types = [quant_type(t).name for t in (types or stats.types)]
    unknown = [t for t in types if t not in stats.types]
    if unknown:
        raise McGgufError(f"the statistics have no errors for {', '.join(unknown)}; "
                          f"they were measured for {', '.join(stats.types)}")
    ckpt = open_checkpoint(model_dir or stats.info["model"])
    if not stats.measured_on(ckpt):
        raise McGgufError(f"{ckpt.path} has {ckpt.n_layers} layers, {len(ckpt.moe_layers)} of them of "
                          f"{ckpt.n_experts} experts; the statistics were measured on {len(stats.layers)} layers, "
                          f"{len(stats.moe_layers)} of them of {stats.n_experts}")
    fixed = set(non_expert or {})  # classes the caller gave a type: kept out of the program
    non_expert = {**NON_EXPERT_DEFAULTS, **{k: v.upper() for k, v in (non_expert or {}).items()}}
    exponents = {"alpha": alpha, "beta": beta, "gamma": gamma}

    scale = np.array([(error_scale or {}).get(t, 1.0) for t in types])
    units, problem = _choices(stats, ckpt, types, layout, per_projection, exponents, scale)
    columns = list(types)
    if scope == "model" and stats.tensors:
        free = [cls for cls in NON_EXPERT_CLASSES if cls not in fixed]
        units, problem, columns = _tensor_choices(stats, ckpt, units, problem, types, free, exponents)
    if size is None:
        budget = _expert_budget(ckpt, bits, scope, layout, columns, non_expert, units, problem)
        choice = solve(problem, budget, per_layer=per_layer, max_types=max_types)
    else:
        choice, bits = _fit_size(ckpt, size, layout, units, columns, non_expert, problem, per_projection,
                                 max_types)
    inputs = {"stats": stats_path, "model": str(ckpt.path.resolve()), "text": stats.info.get("text"),
              "text_sha256": stats.info.get("text_sha256"), "n_tokens": stats.info.get("n_tokens"),
              "types": types, **exponents, "error_scale": dict(error_scale or {}),
              **({"fisher": True} if stats.fisher is not None else {}),
              "cost": float(problem.cost[np.arange(len(choice)), choice].sum()), "mc_gguf_version": __version__}
    budget_info = {"bits": bits, "scope": scope, "per_layer": per_layer, "per_projection": per_projection,
                   "max_types": max_types, **({"size": size} if size is not None else {})}
    return _plan(ckpt, layout, units, choice, columns, non_expert, budget_info, inputs)


def _choices(stats: CalibrationStats, ckpt: Checkpoint, types: list[str], layout: str, per_projection: bool,
             exponents: dict[str, float], error_scale: np.ndarray) -> tuple[list[_Unit], AllocationProblem]:
    """The program's choices and their costs and sizes at every type."""
    columns = [stats.types.index(t) for t in types]
    hidden, ff = ckpt.expert_dims
    parts = ([(EPS_GATE_UP, ("gate", "up")), (EPS_DOWN, ("down",))] if per_projection
             else [(EPS_EXPERT, PROJECTIONS)])
    part_bpw = [projection_bits(ckpt, types, projections) for _, projections in parts]  # the same in every layer
    units, costs, sizes, tensor_of, bpw = [], [], [], [], []
    for bid, layer in stats.moe_layers:
        for part, (row, projections) in enumerate(parts):
            tensor = bid * len(parts) + part
            cost = significance_cost(layer.phi, layer.w, layer.eps[row][:, columns] * error_scale, **exponents)
            cost *= _fisher_weight(stats, lambda fisher, bid=bid: fisher.out[bid])
            n = len(projections) * ff * hidden
            if layout == "stock":
                units.append(_Unit(bid, tuple(range(ckpt.n_experts)), projections))
                costs.append(cost.sum(axis=0))
                sizes.append(n * ckpt.n_experts)
                tensor_of.append(tensor)
                bpw.append(part_bpw[part])
            else:
                for xid in range(ckpt.n_experts):
                    units.append(_Unit(bid, (xid,), projections))
                    costs.append(cost[xid])
                    sizes.append(n)
                    tensor_of.append(tensor)
                    bpw.append(part_bpw[part])
    return units, AllocationProblem(cost=np.array(costs), bits_per_weight=np.array(bpw), n_weights=np.array(sizes),
                                    layer_of=np.array([u.bid for u in units]), tensor_of=np.array(tensor_of))


def _fisher_weight(stats: CalibrationStats, point: Callable[[Fisher], float]) -> float:
    """What a cost is multiplied by: how much the output feels a change at the ``point`` where its error is measured
    (a KL divergence per squared change there), over the mean of every point's; 1 where the statistics have no
    Fisher information."""
    return stats.fisher.relative(point(stats.fisher)) if stats.fisher is not None else 1.0


def other_tensors(ckpt: Checkpoint, classes) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape of the file's other weight matrices of ``classes`` (attention, token_embd, output) that a
    type applies to (norms, routers and biases stay F32)."""
    plan = Plan("stock", expert_table(ckpt, lambda: stored_types(ckpt, "Q8_0")), {}, {})
    return {t.name: t.shape for t in layout_tensors(ckpt, plan)
            if not is_expert_weight(t.name) and t.qtype.name != "F32" and non_expert_class(t.name) in classes}


def _tensor_choices(stats: CalibrationStats, ckpt: Checkpoint, units: list[_Unit], problem: AllocationProblem,
                    types: list[str], classes: list[str], exponents: dict[str, float]
                    ) -> tuple[list[_Unit], AllocationProblem, list[str]]:
    """The experts' program with a choice for each of the file's other tensors of ``classes`` that the statistics
    measured, at the tensor types, and the columns of the program: ``types``, then the tensor types they lack."""
    tensors = {name: shape for name, shape in other_tensors(ckpt, classes).items() if name in stats.tensors}
    if not tensors:
        return units, problem, types
    columns = [*types, *(t for t in stats.tensor_types if t not in types)]
    width = len(columns)
    expert_rows = len(units)
    cost = np.zeros((expert_rows + len(tensors), width))
    bpw = np.zeros((expert_rows + len(tensors), width))
    allowed = np.zeros((expert_rows + len(tensors), width), dtype=bool)
    cost[:expert_rows, :len(types)] = problem.cost
    bpw[:expert_rows, :len(types)] = np.broadcast_to(problem.bits_per_weight, problem.cost.shape)
    allowed[:expert_rows, :len(types)] = True
    tensor_columns = [columns.index(t) for t in stats.tensor_types]
    ones = np.ones(1)
    new_units = list(units)
    for row, (name, shape) in enumerate(tensors.items(), start=expert_rows):
        error = stats.tensors[name].error[None, :]
        cost[row, tensor_columns] = (significance_cost(ones, ones, error, **exponents)[0]
                                     * _fisher_weight(stats, lambda fisher, name=name: fisher.point(name)))
        bpw[row, tensor_columns] = [stored_type(t, shape[-1]).bits_per_weight for t in stats.tensor_types]
        allowed[row, tensor_columns] = True
        new_units.append(_Unit(-1, (), (), tensor=name, row_length=shape[-1]))
    n_tensor = np.array([int(np.prod(shape)) for shape in tensors.values()])
    first_tensor_id = int(problem.tensor_of.max()) + 1 if len(problem.tensor_of) else 0
    return new_units, AllocationProblem(
        cost=cost, bits_per_weight=bpw, n_weights=np.concatenate([problem.n_weights, n_tensor]),
        layer_of=np.concatenate([problem.layer_of, np.full(len(tensors), -1)]),
        tensor_of=np.concatenate([problem.tensor_of, first_tensor_id + np.arange(len(tensors))]),
        allowed=allowed), columns


def projection_bits(ckpt: Checkpoint, types: list[str], projections: tuple[str, ...] = PROJECTIONS) -> np.ndarray:
    """Bits per weight [T] of ``projections`` of an expert when each type is asked for: rows that are not
    whole blocks of a type are stored in its fallback (types.stored_type), at that type's true size."""
    stored = [stored_types(ckpt, t) for t in types]
    return np.array([np.mean([quant_type(s[p]).bits_per_weight for p in projections]) for s in stored])


def _expert_budget(ckpt: Checkpoint, bits: float, scope: str, layout: str, columns: list[str],
                   non_expert: dict[str, str], units: list[_Unit], problem: AllocationProblem) -> float:
    """Bits per weight of the program's choices: ``bits`` itself, or for a whole-model budget what is left of
    bits * (all weights) once the tensors outside the program are paid."""
    if scope != "model":
        return bits
    least = predict(ckpt, _least_plan(ckpt, layout, units, columns, non_expert, problem))
    n_all = least["n_weights"]
    n_units = float(np.sum(problem.n_weights))
    outside_bits = 8 * least["tensor_bytes"] - _least_bits(problem)
    lo, hi = ((b * n_units + outside_bits) / n_all
              for b in feasible_range(problem.bits_per_weight, problem.n_weights, problem.allowed))
    if not lo <= bits <= hi:
        raise InfeasibleBudgetError(
            f"a budget of {bits:.3f} bits per weight over the whole model is infeasible with these types and "
            f"non-expert tensors at {non_expert}; feasible budgets are {lo:.3f} to {hi:.3f}")
    return (bits * n_all - outside_bits) / n_units


def _least_bits(problem: AllocationProblem) -> float:
    """Bits of the program's choices, each at its smallest type."""
    return average_bits(problem, problem.smallest_choice()) * float(np.sum(problem.n_weights))


def _least_plan(ckpt: Checkpoint, layout: str, units: list[_Unit], columns: list[str], non_expert: dict[str, str],
                problem: AllocationProblem) -> Plan:
    """Every choice of the program at its smallest type (its fewest bits)."""
    return _plan(ckpt, layout, units, problem.smallest_choice(), columns, non_expert, {}, {}, sized=False)


def _fit_size(ckpt: Checkpoint, size: int, layout: str, units: list[_Unit], columns: list[str],
              non_expert: dict[str, str], problem: AllocationProblem, per_projection: bool,
              max_types: int | None) -> tuple[np.ndarray, float]:
    """The program's choice for a file of at most ``size`` bytes, and that size as bits per weight of the file.

    The choices get what is left once the header, the mc-gguf keys (metadata_allowance) and the tensors outside
    the program are paid (the largest types where more is left than they need). The smallest file's header has a
    tensor per projection; the chosen types' expert groups add tensors (and their padding) to it, so the budget
    goes down by what the plan's file is over, in growing steps, the last try every choice at its smallest type
    (the file check_size found to fit)."""
    expert_types = [t for t, ok in zip(columns, problem.allowed_mask()[0]) if ok]
    least_tensors = _least_plan(ckpt, layout, units, columns, non_expert, problem).tensors
    least = check_size(ckpt, size, layout, expert_types, non_expert, per_projection, tensors=least_tensors)
    other = least["file_bytes"] + metadata_allowance(ckpt) - _least_bits(problem) / 8
    n_units = float(np.sum(problem.n_weights))
    lowest, hi = feasible_range(problem.bits_per_weight, problem.n_weights, problem.allowed)
    budget = min(hi, max(lowest, 8 * (size - other) / n_units))
    for attempt in range(1, SIZE_ATTEMPTS + 1):
        choice = solve(problem, budget, max_types=max_types)
        predicted = _plan(ckpt, layout, units, choice, columns, non_expert, {}, {}).predicted["file_bytes"]
        excess = predicted + metadata_allowance(ckpt) - size
        if excess <= 0:
            return choice, min(8 * size / least["n_weights"], MAX_BITS)
        if attempt == SIZE_ATTEMPTS or budget == lowest:
            raise InfeasibleBudgetError(f"no plan of these types fits in {size:,} bytes with its header "
                                        f"({excess:,} bytes over after {attempt} tries)")
        budget = lowest if attempt == SIZE_ATTEMPTS - 1 else max(lowest, budget - 8 * excess * attempt / n_units)


def check_size(ckpt: Checkpoint, size: int, layout: str, types: list[str], non_expert: dict[str, str],
               per_projection: bool = False, tensors: dict[str, str] | None = None) -> dict:
    """predict's figures of the smallest file: every choice of the program (an expert, or its gate+up and its down
    with ``per_projection``) at its smallest of ``types``, the other tensors at ``tensors`` (GGUF name -> type) or
    their class's type; InfeasibleBudgetError when a file of ``size`` bytes cannot hold even that (compress asks
    this before calibrating)."""
    non_expert = {**NON_EXPERT_DEFAULTS, **non_expert}
    stored = [stored_types(ckpt, t) for t in types]
    hidden, ff = ckpt.expert_dims
    smallest = {}
    for part in ((("gate", "up"), ("down",)) if per_projection else (PROJECTIONS,)):
        def part_bits(s: dict[str, str], part=part) -> float:
            return sum(quant_type(s[p]).bits_per_weight * hidden * ff for p in part)
        smallest |= {p: min(stored, key=part_bits)[p] for p in part}
    least = predict(ckpt, Plan(layout, expert_table(ckpt, lambda: dict(smallest)), non_expert, {},
                               tensors=dict(tensors or {})))
    needed = least["file_bytes"] + metadata_allowance(ckpt)
    if size < needed:
        others = (f"the other tensors at their smallest types where the budget chooses them, else {non_expert}"
                  if tensors else f"non-expert tensors at {non_expert}")
        raise InfeasibleBudgetError(
            f"a file of {size:,} bytes is smaller than these types and {others} can make: "
            f"at least {needed:,} bytes, with every expert at its smallest type (the other tensors and the header "
            f"{needed - least['expert_bytes']:,}); lower the non-expert types (--tensor-type) or allow smaller types")
    return least


def smallest_tensor_types(ckpt: Checkpoint, fixed: set[str], tensor_types: list[str]) -> dict[str, str]:
    """The other tensors of the classes not in ``fixed``, each at the smallest of ``tensor_types`` (what a
    calibration that measures them lets the program choose): check_size's ``tensors`` before calibrating."""
    if not tensor_types:
        return {}
    free = [cls for cls in NON_EXPERT_CLASSES if cls not in fixed]
    return {name: min((stored_type(t, shape[-1]) for t in tensor_types), key=lambda q: q.bits_per_weight).name
            for name, shape in other_tensors(ckpt, free).items()}


def expert_table(ckpt: Checkpoint, types: Callable[[], dict[str, str]]) -> list[list[dict[str, str]]]:
    """Plan.experts' shape for ``ckpt``: ``types()`` for every expert of every MoE layer; a dense layer has none."""
    return [[types() for _ in range(ckpt.n_experts)] if ckpt.is_moe(bid) else [] for bid in range(ckpt.n_layers)]


def stored_types(ckpt: Checkpoint, type_name: str) -> dict[str, str]:
    """The type each projection of an expert is stored in when ``type_name`` is asked for (types.stored_type)."""
    hidden, ff = ckpt.expert_dims
    return {p: stored_type(type_name, row_length(p, hidden, ff)).name for p in PROJECTIONS}


def _plan(ckpt: Checkpoint, layout: str, units: list[_Unit], choice: np.ndarray, columns: list[str],
          non_expert: dict[str, str], budget: dict, inputs: dict, sized: bool = True) -> Plan:
    """The plan of the chosen types, each projection (and other tensor) at the type its rows are stored in."""
    stored = {t: stored_types(ckpt, t) for t in columns}
    experts = expert_table(ckpt, dict)
    tensors = {}
    for unit, t in zip(units, choice):
        if unit.tensor is not None:
            tensors[unit.tensor] = stored_type(columns[t], unit.row_length).name
            continue
        for xid in unit.experts:
            for projection in unit.projections:
                experts[unit.bid][xid][projection] = stored[columns[t]][projection]
    plan = Plan(layout=layout, experts=experts, non_expert=non_expert, budget=budget, inputs=inputs, tensors=tensors)
    if sized:
        plan.predicted = predict(ckpt, plan)
    return plan


def uniform_plan(ckpt: Checkpoint, type_name: str, non_expert: dict[str, str] | None = None) -> Plan:
    """Every expert at one type (llama.cpp's recipe, for comparison and for tests)."""
    name = quant_type(type_name).name
    plan = Plan("stock", expert_table(ckpt, lambda: stored_types(ckpt, name)),
                {**NON_EXPERT_DEFAULTS, **(non_expert or {})}, {"bits": quant_type(name).bits_per_weight,
                                                               "scope": "experts", "uniform": name})
    plan.predicted = predict(ckpt, plan)
    return plan
