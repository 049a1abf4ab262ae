"""A quantization plan: the GGUF type of every expert tensor and of everything else, chosen by the allocator.

``make_plan`` turns calibration statistics into the integer program of
allocate.py and its answer into a :class:`Plan`, a JSON file a person can read
and edit: the type of every expert's gate, up and down projection, the types
of the non-expert tensors, the budget, the predicted size and where it all came
from.

Granularity of the choice:
- layout ``per-expert`` (default): one type per expert (or, with
  ``per_projection``, one for its gate+up and one for its down projection);
  the file needs the patched runtime when a layer's experts differ.
- layout ``stock``: one type per (layer, projection) tensor, so the file loads
  in unmodified llama.cpp; the same program chooses, with the summed cost of
  the layer's experts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np

from mc_gguf import __version__
from mc_gguf.allocate import AUTHORS_COST, AllocationProblem, InfeasibleBudgetError, allocate, significance_cost
from mc_gguf.atomic import atomic_output
from mc_gguf.checkpoint import Checkpoint, open_checkpoint
from mc_gguf.convert import fit_type, model_metadata, plan_tensors
from mc_gguf.errors import McGgufError
from mc_gguf.expert_layout import PROJECTIONS, ExpertGroup, expert_groups, tensor_names
from mc_gguf.quant_types import quant_type
from mc_gguf.stats import EPS_DOWN, EPS_EXPERT, EPS_GATE_UP, CalibrationStats
from mc_gguf.write import OutputTensor, predict_file_bytes

LAYOUTS = ("per-expert", "stock")
SCOPES = ("experts", "model")
FORMAT_VERSION = 1

# Non-expert tensors by class. Defaults keep them at high precision: in
# Mixtral they are a few percent of the weights (attention 1.3 B of 47 B) and
# every token uses all of them. Norms and the router always stay F32.
NON_EXPERT_CLASSES = ("token_embd", "output", "attn")
NON_EXPERT_DEFAULTS = {"token_embd": "Q8_0", "output": "Q8_0", "attn": "Q8_0"}
NON_EXPERT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K")

T = gguf.GGMLQuantizationType
EXPERT_KINDS = {gguf.MODEL_TENSOR.FFN_GATE_EXP: "gate", gguf.MODEL_TENSOR.FFN_UP_EXP: "up",
                gguf.MODEL_TENSOR.FFN_DOWN_EXP: "down"}


class PlanFileError(McGgufError):
    """A plan file is missing, corrupt or does not fit the model."""


@dataclass
class Plan:
    layout: str
    experts: list[list[dict[str, str]]]   # [layer][expert] -> {"gate": type, "up": type, "down": type}
    non_expert: dict[str, str]            # class (token_embd, output, attn) -> type
    budget: dict                          # bits, scope, per_layer, per_projection
    predicted: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.experts)

    def projection_types(self, bid: int, projection: str) -> list[str]:
        return [expert[projection] for expert in self.experts[bid]]

    def expert_bits(self) -> np.ndarray:
        """Average bits per weight of every expert [layers, experts] (for tables and heat maps)."""
        shares = {"gate": 1 / 3, "up": 1 / 3, "down": 1 / 3}
        return np.array([[sum(shares[p] * quant_type(e[p]).bits_per_weight for p in PROJECTIONS) for e in layer]
                         for layer in self.experts])

    def save(self, path: str | Path) -> Path:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT_VERSION, **asdict(self)}, indent=1) + "\n", encoding="utf-8")
        return Path(path)


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanFileError(f"plan {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanFileError(f"{path} is not a plan (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT_VERSION:
        raise PlanFileError(f"{path} is not an mc-gguf plan of format {FORMAT_VERSION}")
    try:
        plan = Plan(**data)
    except TypeError as exc:
        raise PlanFileError(f"{path}: {exc}") from None
    validate_plan(plan, path)
    return plan


def validate_plan(plan: Plan, where: str | Path = "plan") -> None:
    if plan.layout not in LAYOUTS:
        raise PlanFileError(f"{where}: layout {plan.layout!r} is not one of {', '.join(LAYOUTS)}")
    for bid, layer in enumerate(plan.experts):
        for xid, expert in enumerate(layer):
            if set(expert) != set(PROJECTIONS):
                raise PlanFileError(f"{where}: layer {bid} expert {xid} needs types for {', '.join(PROJECTIONS)}")
            for name in expert.values():
                try:
                    quant_type(name)
                except ValueError as exc:
                    raise PlanFileError(f"{where}: layer {bid} expert {xid}: {exc}") from None
        if plan.layout == "stock":
            for projection in PROJECTIONS:
                if len(set(plan.projection_types(bid, projection))) > 1:
                    raise PlanFileError(f"{where}: a stock plan gives one type per layer and projection; "
                                        f"layer {bid} {projection} has several")
    for cls, name in plan.non_expert.items():
        if cls not in NON_EXPERT_CLASSES or name.upper() not in NON_EXPERT_TYPES:
            raise PlanFileError(f"{where}: non-expert type {cls}={name} is not supported "
                                f"(classes {', '.join(NON_EXPERT_CLASSES)}; types {', '.join(NON_EXPERT_TYPES)})")


def non_expert_class(gguf_name: str) -> str:
    if gguf_name.startswith("token_embd"):
        return "token_embd"
    if gguf_name.startswith("output"):
        return "output"
    return "attn"


def plan_type_chooser(plan: Plan):
    """convert.TypeChooser for a plan: the stacked expert tensors get their layer's single type
    (stock layout), every other tensor its class's type."""
    def type_for(kind: gguf.MODEL_TENSOR, name: str, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
        if kind in EXPERT_KINDS:
            bid = int(name.split(".")[1])
            types = set(plan.projection_types(bid, EXPERT_KINDS[kind]))
            return quant_type(types.pop()).qtype if len(types) == 1 else T.F32
        wanted = plan.non_expert.get(non_expert_class(name), NON_EXPERT_DEFAULTS[non_expert_class(name)])
        return fit_type(kind, shape, T[wanted.upper()])
    return type_for


# Produces the bytes of one expert group: (layer, projection, group) -> uint8 [n_experts, rows, row_bytes].
GroupProducer = Callable[[int, str, ExpertGroup], np.ndarray]


def layout_tensors(ckpt: Checkpoint, plan: Plan, produce_group: GroupProducer | None = None) -> list[OutputTensor]:
    """Every tensor of the file the plan describes, expert groups split as expert_layout.py names them.

    Without ``produce_group`` the expert tensors are described only (their
    ``produce`` raises); quantize.py supplies it.
    """
    def no_data() -> np.ndarray:
        raise AssertionError("this tensor list only describes the expert tensors")

    tensors = []
    for tensor in plan_tensors(ckpt, plan_type_chooser(plan)):
        parts = tensor.name.split(".")
        projection = parts[2][len("ffn_"):-len("_exps")] if len(parts) == 4 and parts[2].endswith("_exps") else None
        if projection is None:
            tensors.append(tensor)
            continue
        bid = int(parts[1])
        groups = expert_groups(plan.projection_types(bid, projection))
        for group, name in zip(groups, tensor_names(bid, projection, groups)):
            shape = (len(group.experts), *tensor.shape[1:])
            produce = no_data if produce_group is None else (
                lambda bid=bid, projection=projection, group=group: produce_group(bid, projection, group))
            tensors.append(OutputTensor(name, shape, quant_type(group.type_name).qtype, produce))
    return tensors


def tensor_totals(tensors: list[OutputTensor]) -> dict:
    """Bytes, weights and bits per weight of a tensor list, experts and all."""
    expert = [t for t in tensors if "_exps." in t.name]
    n_expert = sum(int(np.prod(t.shape)) for t in expert)
    n_all = sum(int(np.prod(t.shape)) for t in tensors)
    expert_bytes = sum(t.nbytes for t in expert)
    tensor_bytes = sum(t.nbytes for t in tensors)
    return {
        "expert_bpw": 8 * expert_bytes / n_expert,
        "model_bpw": 8 * tensor_bytes / n_all,
        "expert_bytes": expert_bytes,
        "tensor_bytes": tensor_bytes,
        "n_expert_weights": n_expert,
        "n_weights": n_all,
    }


def predict(ckpt: Checkpoint, plan: Plan) -> dict:
    """Bytes and bits per weight of the file the plan describes (header included, counted exactly)."""
    tensors = layout_tensors(ckpt, plan)
    file_bytes = predict_file_bytes(gguf.MODEL_ARCH_NAMES[ckpt.arch.gguf_arch],
                                    model_metadata(ckpt, gguf.LlamaFileType.GUESSED), tensors)
    return {**tensor_totals(tensors), "file_bytes": file_bytes,
            "layer_expert_bpw": [float(b) for b in plan.expert_bits().mean(axis=1)]}


@dataclass(frozen=True)
class _Unit:
    """One choice of the integer program: some projections of some experts of one layer."""
    bid: int
    experts: tuple[int, ...]
    projections: tuple[str, ...]


def make_plan(stats: CalibrationStats, bits: float, *, model_dir: str | Path | None = None,
              layout: str = "per-expert", scope: str = "experts", per_layer: bool = False,
              per_projection: bool = False, types: list[str] | None = None,
              alpha: float = AUTHORS_COST["alpha"], beta: float = AUTHORS_COST["beta"],
              gamma: float = AUTHORS_COST["gamma"], non_expert: dict[str, str] | None = None,
              stats_path: str | None = None, max_types: int | None = None) -> Plan:
    """Choose every expert's type for an average of ``bits`` bits per weight over ``scope``.

    ``max_types`` bounds the distinct types (expert groups of the per-expert layout) in
    every layer and projection.
    """
    if layout not in LAYOUTS:
        raise McGgufError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if scope not in SCOPES:
        raise McGgufError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    if per_layer and (layout == "stock" or scope == "model"):
        raise McGgufError("--per-layer reproduces the paper's per-layer expert budget: it needs the per-expert "
                          "layout and the experts scope")
    types = [quant_type(t).name for t in (types or stats.types)]
    unknown = [t for t in types if t not in stats.types]
    if unknown:
        raise McGgufError(f"the statistics have no errors for {', '.join(unknown)}; "
                          f"they were measured for {', '.join(stats.types)}")
    columns = [stats.types.index(t) for t in types]
    ckpt = open_checkpoint(model_dir or stats.info["model"])
    if ckpt.n_layers != len(stats.layers) or ckpt.n_experts != stats.layers[0].count.shape[0]:
        raise McGgufError(f"{ckpt.path} has {ckpt.n_layers} layers of {ckpt.n_experts} experts; the statistics "
                          f"were measured on {len(stats.layers)} layers of {stats.layers[0].count.shape[0]}")
    non_expert = {**NON_EXPERT_DEFAULTS, **{k: v.upper() for k, v in (non_expert or {}).items()}}

    hidden, ff = ckpt.expert_dims
    parts = ([(EPS_GATE_UP, ("gate", "up")), (EPS_DOWN, ("down",))] if per_projection
             else [(EPS_EXPERT, PROJECTIONS)])
    units, costs, sizes, tensor_of = [], [], [], []
    for bid, layer in enumerate(stats.layers):
        for part, (row, projections) in enumerate(parts):
            tensor = bid * len(parts) + part
            cost = significance_cost(layer.phi, layer.w, layer.eps[row][:, columns], alpha, beta, gamma)
            n = len(projections) * ff * hidden
            if layout == "stock":
                units.append(_Unit(bid, tuple(range(ckpt.n_experts)), projections))
                costs.append(cost.sum(axis=0))
                sizes.append(n * ckpt.n_experts)
                tensor_of.append(tensor)
            else:
                for xid in range(ckpt.n_experts):
                    units.append(_Unit(bid, (xid,), projections))
                    costs.append(cost[xid])
                    sizes.append(n)
                    tensor_of.append(tensor)
    bpw = np.array([quant_type(t).bits_per_weight for t in types])
    problem = AllocationProblem(cost=np.array(costs), bits_per_weight=bpw, n_weights=np.array(sizes),
                                layer_of=np.array([u.bid for u in units]), tensor_of=np.array(tensor_of))

    expert_budget = bits
    if scope == "model":
        # the non-expert tensors' bits are fixed; what is left of B * (all weights) goes to the experts
        draft = Plan(layout, [[dict.fromkeys(PROJECTIONS, types[0])] * ckpt.n_experts] * ckpt.n_layers,
                     non_expert, {})
        fixed = predict(ckpt, draft)
        n_all, n_exp = fixed["n_weights"], fixed["n_expert_weights"]
        fixed_bits = 8 * (fixed["tensor_bytes"] - fixed["expert_bytes"])
        expert_budget = (bits * n_all - fixed_bits) / n_exp
        lo, hi = ((b * n_exp + fixed_bits) / n_all for b in (bpw.min(), bpw.max()))
        if not lo <= bits <= hi:
            raise InfeasibleBudgetError(
                f"a budget of {bits:.3f} bits per weight over the whole model is infeasible with these types and "
                f"non-expert tensors at {non_expert}; feasible budgets are {lo:.3f} to {hi:.3f}")
    choice = allocate(problem, expert_budget, per_layer=per_layer, max_types=max_types)

    experts: list[list[dict[str, str]]] = [[{} for _ in range(ckpt.n_experts)] for _ in range(ckpt.n_layers)]
    for unit, t in zip(units, choice):
        for xid in unit.experts:
            for projection in unit.projections:
                experts[unit.bid][xid][projection] = types[t]
    plan = Plan(
        layout=layout, experts=experts, non_expert=non_expert,
        budget={"bits": bits, "scope": scope, "per_layer": per_layer, "per_projection": per_projection,
                "max_types": max_types},
        inputs={
            "stats": stats_path, "model": str(ckpt.path.resolve()), "text": stats.info.get("text"),
            "text_sha256": stats.info.get("text_sha256"), "n_tokens": stats.info.get("n_tokens"),
            "types": types, "alpha": alpha, "beta": beta, "gamma": gamma,
            "cost": float(problem.cost[np.arange(len(choice)), choice].sum()), "mc_gguf_version": __version__,
        },
    )
    plan.predicted = predict(ckpt, plan)
    return plan


def uniform_plan(ckpt: Checkpoint, type_name: str, non_expert: dict[str, str] | None = None) -> Plan:
    """Every expert at one type (llama.cpp's recipe, for comparison and for tests)."""
    name = quant_type(type_name).name
    plan = Plan("stock", [[dict.fromkeys(PROJECTIONS, name) for _ in range(ckpt.n_experts)]
                          for _ in range(ckpt.n_layers)],
                {**NON_EXPERT_DEFAULTS, **(non_expert or {})}, {"bits": quant_type(name).bits_per_weight,
                                                               "scope": "experts", "uniform": name})
    plan.predicted = predict(ckpt, plan)
    return plan
