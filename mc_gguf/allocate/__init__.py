"""Stage 2, allocate: a GGUF type for every expert under a bits-per-weight budget.

    allocate(stats, bits) -> Plan   (a JSON file, plan.py)

cost.py (the significance cost and its exponents), program.py (the integer
program, HiGHS), allocation.py (statistics -> program -> plan), size.py (the
file a plan describes, to the byte), show.py (tables and heat maps).
"""

from mc_gguf._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "allocate": "allocation",
    "uniform_plan": "allocation",
    "Plan": "plan",
    "load_plan": "plan",
    "InfeasibleBudgetError": "program",
    "predict": "size",
})
