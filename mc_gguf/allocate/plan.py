"""The plan: the GGUF type of every expert projection and of every other tensor, as a JSON file a person can edit.

``allocate`` (allocation.py) writes it from calibration statistics; ``quantize``
reads it. This module holds the model, its file and its validation only, and
imports nothing heavy (the command line reads the layouts and defaults here).

Granularity of the choice:
- layout ``per-expert`` (default): one type per expert (or, with
  ``per_projection``, one for its gate+up and one for its down projection);
  the file needs the patched runtime when a layer's experts differ.
- layout ``stock``: one type per (layer, projection) tensor, so the file loads
  in unmodified llama.cpp.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mc_gguf.artifact import load_json, save_json
from mc_gguf.errors import McGgufError
from mc_gguf.ggml.types import quant_type
from mc_gguf.gguf_io.layout import PROJECTIONS

LAYOUTS = ("per-expert", "stock")
SCOPES = ("experts", "model")
FORMAT_VERSION = 1

# Non-expert tensors by class. Defaults keep them at high precision: in
# Mixtral they are a few percent of the weights (attention 1.3 B of 47 B) and
# every token uses all of them. Norms and the router always stay F32.
NON_EXPERT_CLASSES = ("token_embd", "output", "attn")
NON_EXPERT_DEFAULTS = {"token_embd": "Q8_0", "output": "Q8_0", "attn": "Q8_0"}
NON_EXPERT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K", "Q2_K")



def non_expert_class(gguf_name: str) -> str:
    """The class (NON_EXPERT_CLASSES) of a GGUF tensor that is not an expert's."""
    if gguf_name.startswith("token_embd"):
        return "token_embd"
    if gguf_name.startswith("output"):
        return "output"
    return "attn"


class PlanFileError(McGgufError):
    """A plan file is missing, corrupt or does not fit the model."""


@dataclass
class Plan:
    layout: str
    experts: list[list[dict[str, str]]]   # [layer][expert] -> {"gate": type, "up": type, "down": type};
                                          # [] for a dense layer (no experts)
    non_expert: dict[str, str]            # class (token_embd, output, attn) -> type
    budget: dict                          # bits, scope, per_layer, per_projection
    predicted: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    # GGUF name -> type of the other tensors the budget chose (attention, token_embd, output); before their class
    tensors: dict[str, str] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.experts)

    def projection_types(self, bid: int, projection: str) -> list[str]:
        return [expert[projection] for expert in self.experts[bid]]

    @property
    def moe_layers(self) -> list[int]:
        return [bid for bid, layer in enumerate(self.experts) if layer]

    def expert_bits(self):
        """Average bits per weight of every expert, numpy [layers, experts] (for tables and heat maps); NaN in
        the rows of dense layers."""
        import numpy as np

        bits = np.full((self.n_layers, max(map(len, self.experts), default=0)), np.nan)
        for bid in self.moe_layers:
            bits[bid] = [sum(quant_type(e[p]).bits_per_weight for p in PROJECTIONS) / len(PROJECTIONS)
                         for e in self.experts[bid]]
        return bits

    def save(self, path: str | Path) -> Path:
        return save_json(path, FORMAT_VERSION, asdict(self))


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    data = load_json(path, FORMAT_VERSION, "plan", PlanFileError)
    try:
        plan = Plan(**data)
    except TypeError as exc:
        raise PlanFileError(f"{path}: {exc}") from None
    validate_plan(plan, path)
    # type names as ggml spells them ("q4_k" is Q4_K): they name the expert groups and the file's mc.plan.types
    plan.experts = [[{p: quant_type(t).name for p, t in expert.items()} for expert in layer]
                    for layer in plan.experts]
    plan.non_expert = {cls: name.upper() for cls, name in plan.non_expert.items()}
    plan.tensors = {name: tensor_type_name(t) for name, t in plan.tensors.items()}
    return plan


def tensor_type_name(name: str) -> str:
    """A type of one of the other tensors, as ggml spells it: a class type or one it falls back to."""
    return name.upper() if name.upper() in NON_EXPERT_TYPES else quant_type(name).name


def validate_plan(plan: Plan, where: str | Path = "plan") -> None:
    if plan.layout not in LAYOUTS:
        raise PlanFileError(f"{where}: layout {plan.layout!r} is not one of {', '.join(LAYOUTS)}")
    if not isinstance(plan.experts, list) or not all(
            isinstance(layer, list) and all(isinstance(e, dict) for e in layer) for layer in plan.experts):
        raise PlanFileError(f"{where}: experts must be a list of layers, each a list of {{projection: type}}")
    if not isinstance(plan.non_expert, dict) or not all(isinstance(t, str) for t in plan.non_expert.values()):
        raise PlanFileError(f"{where}: non_expert must be {{class: type}}")
    if len({len(layer) for layer in plan.experts if layer}) > 1:
        raise PlanFileError(f"{where}: its layers have {', '.join(str(len(layer)) for layer in plan.experts)} experts; "
                            "every layer with experts has as many")
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
    if not isinstance(plan.tensors, dict) or not all(
            isinstance(k, str) and isinstance(t, str) for k, t in plan.tensors.items()):
        raise PlanFileError(f"{where}: tensors must be {{GGUF tensor name: type}}")
    for name, type_name in plan.tensors.items():
        if "_exps" in name:
            raise PlanFileError(f"{where}: tensors gives {name} a type; experts' types are in experts")
        try:
            tensor_type_name(type_name)
        except ValueError as exc:
            raise PlanFileError(f"{where}: tensor {name}: {exc}") from None
    _validate_records(plan, where)


# what a plan records besides its types, read by plan-show (allocate/show.py) and written into the GGUF
# (quantize: mc.plan.budget_bpw, mc.plan.scope): the sizes allocate predicted, all or none of them
PREDICTED = ("expert_bpw", "expert_bytes", "file_bytes", "model_bpw")
MAX_BITS = 32  # bits per weight of F32, the widest type a plan can give


def _validate_records(plan: Plan, where: str | Path) -> None:
    for name in ("budget", "predicted", "inputs"):
        if not isinstance(getattr(plan, name), dict):
            raise PlanFileError(f"{where}: {name} must be a JSON object, the plan has {getattr(plan, name)!r}")
    bits, scope = plan.budget.get("bits"), plan.budget.get("scope", "experts")
    if bits is not None and not (_number(bits) and 0 <= bits <= MAX_BITS):
        raise PlanFileError(f"{where}: budget bits {bits!r} is not a number of bits per weight (0 to {MAX_BITS})")
    if scope not in SCOPES:
        raise PlanFileError(f"{where}: budget scope {scope!r} is not one of {', '.join(SCOPES)}")
    if plan.predicted and not all(_number(plan.predicted.get(key)) and plan.predicted[key] >= 0 for key in PREDICTED):
        raise PlanFileError(f"{where}: predicted must be {{}} or hold {', '.join(PREDICTED)} as numbers at least 0")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
