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

from mc_gguf.quant_types import CANDIDATES

PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertGroup:
    type_name: str
    experts: tuple[int, ...]   # global expert ids, ascending


def expert_groups(types: Sequence[str]) -> list[ExpertGroup]:
    """Group a (layer, projection)'s experts by type, groups in the registry's order (fewest bits first)."""
    order = {name: i for i, name in enumerate(CANDIDATES)}
    names = sorted(set(types), key=lambda name: order.get(name, len(order)))
    return [ExpertGroup(name, tuple(x for x, t in enumerate(types) if t == name)) for name in names]


def stacked_name(bid: int, projection: str) -> str:
    return f"blk.{bid}.ffn_{projection}_exps.weight"


def group_name(bid: int, projection: str, group: int) -> str:
    return f"blk.{bid}.ffn_{projection}_exps.g{group}.weight"


def tensor_names(bid: int, projection: str, groups: Sequence[ExpertGroup]) -> list[str]:
    """The tensor name of each group: the stock name when there is one group."""
    if len(groups) == 1:
        return [stacked_name(bid, projection)]
    return [group_name(bid, projection, g) for g in range(len(groups))]
