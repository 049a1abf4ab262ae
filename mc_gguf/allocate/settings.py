"""How allocate chooses: the settings, free of heavy imports (the command line reads their defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mc_gguf.allocate.cost import AUTHORS_COST


@dataclass(frozen=True)
class AllocateSettings:
    """allocation.allocate's choices besides the budget (its keyword arguments, by the same names)."""

    layout: str = "per-expert"               # plan.LAYOUTS
    scope: str = "experts"                   # what the budget averages over: experts or model
    per_layer: bool = False                  # the paper's per-layer expert budget
    # a type for each expert's gate+up and another for its down; None: on when compress tunes
    per_projection: bool | None = False
    types: tuple[str, ...] | None = None     # candidate types; None: every one the statistics measured
    alpha: float = AUTHORS_COST["alpha"]     # the significance cost's exponents (cost.py)
    beta: float = AUTHORS_COST["beta"]
    gamma: float = AUTHORS_COST["gamma"]
    # types of non-expert classes (plan.NON_EXPERT_CLASSES) fixed by the user; the others are plan.NON_EXPERT_DEFAULTS,
    # or with a whole-model budget chosen by the program tensor by tensor where the calibration measured them
    non_expert: dict[str, str] = field(default_factory=dict)
    max_types: int | None = None             # most types (expert groups) per layer and projection

    def options(self, tuned: bool = False) -> dict:
        """The keyword arguments of allocation.allocate; ``per_projection`` None resolved by ``tuned``."""
        per_projection = tuned if self.per_projection is None else self.per_projection
        return {"layout": self.layout, "scope": self.scope, "per_layer": self.per_layer,
                "per_projection": per_projection, "types": list(self.types) if self.types else None,
                "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "non_expert": dict(self.non_expert),
                "max_types": self.max_types}
