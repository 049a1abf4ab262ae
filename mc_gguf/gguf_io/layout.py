"""How a layer's experts are stored: one stacked tensor per projection, or groups of equal type.

llama.cpp keeps all experts of a layer and projection in one 3-D tensor
``blk.N.ffn_{gate,up,down}_exps.weight`` of one type. When a plan gives the
experts of one (layer, projection) different types, the per-expert layout
stores one 3-D tensor per type, ``blk.N.ffn_{proj}_exps.g{G}.weight``, holding
that group's experts in ascending expert order; docs/FORMAT.md has the
metadata that maps a global expert id to (group, local id). A (layer,
projection) whose experts share one type keeps the stock name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mc_gguf.ggml.types import TYPES

PROJECTIONS = ("gate", "up", "down")


def row_length(projection: str, hidden: int, ff: int) -> int:
    """Weights per row of an expert projection: gate and up [F, H] have rows of H, down [H, F] of F."""
    return ff if projection == "down" else hidden


@dataclass(frozen=True)
class ExpertGroup:
    type_name: str
    experts: tuple[int, ...]   # global expert ids, ascending


def expert_groups(types: Sequence[str]) -> list[ExpertGroup]:
    """Group a (layer, projection)'s experts by type, groups in the registry's order (fewest bits first)."""
    order = {name: i for i, name in enumerate(TYPES)}
    names = sorted(set(types), key=lambda name: order.get(name, len(order)))
    return [ExpertGroup(name, tuple(x for x, t in enumerate(types) if t == name)) for name in names]


def is_expert_weight(name: str) -> bool:
    """Is a GGUF tensor routed experts' weights, stacked or a group (not gpt-oss's ffn_*_exps.bias, which
    llama.cpp's converter writes and the file keeps in F32)?"""
    return "_exps" in name and name.endswith(".weight")


def stacked_name(bid: int, projection: str) -> str:
    return f"blk.{bid}.ffn_{projection}_exps.weight"


def group_name(bid: int, projection: str, group: int) -> str:
    return f"blk.{bid}.ffn_{projection}_exps.g{group}.weight"


def odp_mean_name(bid: int) -> str:
    """Online Dynamic Pruning's mean outputs of layer ``bid``'s experts, F32 [E, H] (prune/means.py; the runtime's
    llm_mc_expert_groups::odp_mean, patch 0011)."""
    return f"blk.{bid}.ffn_odp_mean.weight"


def tensor_names(bid: int, projection: str, groups: Sequence[ExpertGroup]) -> list[str]:
    """The tensor name of each group: the stock name when there is one group."""
    if len(groups) == 1:
        return [stacked_name(bid, projection)]
    return [group_name(bid, projection, g) for g in range(len(groups))]


def group_map_problem(group_of_all: Sequence[int], expert_counts: dict[str, int], n_layer: int,
                      n_expert: int, n_dense: int = 0) -> str | None:
    """What is wrong with a file's mc.experts.groups, checked as the runtime's loader checks it, or None.

    ``expert_counts`` maps each expert tensor name in the file to its number of
    experts (its outermost dimension); the first ``n_dense`` layers (leading_dense_block_count) have no
    experts, and their rows are not read.
    """
    if len(group_of_all) != n_layer * 3 * n_expert:
        return f"mc.experts.groups has {len(group_of_all)} values, expected n_layer * 3 * n_expert = {n_layer * 3 * n_expert}"
    for bid in range(n_dense, n_layer):
        for p, projection in enumerate(PROJECTIONS):
            group_of = list(group_of_all[(bid * 3 + p) * n_expert:(bid * 3 + p + 1) * n_expert])
            if any(not 0 <= g < n_expert for g in group_of):
                return f"mc.experts.groups: layer {bid} {projection} has a group outside [0, {n_expert})"
            n_groups = max(group_of) + 1
            if stacked_name(bid, projection) in expert_counts:
                if n_groups != 1:
                    return f"mc.experts.groups: layer {bid} {projection} has one stacked tensor but {n_groups} groups"
                continue
            for g in range(n_groups):
                name = group_name(bid, projection, g)
                members = group_of.count(g)
                if members == 0:
                    return f"mc.experts.groups: layer {bid} {projection} group {g} has no experts"
                if name not in expert_counts:
                    return f"mc.experts.groups: tensor {name} is missing"
                if expert_counts[name] != members:
                    return (f"mc.experts.groups: {name} holds {expert_counts[name]} experts, "
                            f"the map puts {members} in it")
        gate = group_of_all[(bid * 3) * n_expert:(bid * 3 + 1) * n_expert]
        up = group_of_all[(bid * 3 + 1) * n_expert:(bid * 3 + 2) * n_expert]
        if list(gate) != list(up) or ((stacked_name(bid, "gate") in expert_counts)
                                      != (stacked_name(bid, "up") in expert_counts)):
            return f"mc.experts.groups: layer {bid} groups gate and up differently"
    return None
