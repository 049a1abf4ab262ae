"""A plan for people: a table of types per layer and a heat map of the bits of every expert."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mc_gguf.allocate.plan import Plan
from mc_gguf.ggml.types import TYPES
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.layout import PROJECTIONS


def describe_plan(plan: Plan) -> str:
    bits = plan.expert_bits()
    lines = [f"layout {plan.layout}, budget {plan.budget.get('bits')} bits per weight over "
             f"{plan.budget.get('scope', 'experts')}; non-expert tensors: "
             + ", ".join(f"{k} {v}" for k, v in plan.non_expert.items()),
             f"{'layer':>5}  {'bpw':>5}  types of the expert projections (count)"]
    for bid, layer in enumerate(plan.experts):
        if not layer:
            lines.append(f"{bid:>5}  {'-':>5}  dense FFN (no experts)")
            continue
        counts = Counter(expert[p] for expert in layer for p in PROJECTIONS)
        ordered = sorted(counts, key=list(TYPES).index)
        lines.append(f"{bid:>5}  {bits[bid].mean():5.2f}  " + ", ".join(f"{t} x{counts[t]}" for t in ordered))
    p = plan.predicted
    if p:
        lines.append(f"experts: {p['expert_bpw']:.3f} bits per weight, {p['expert_bytes'] / 1e6:.2f} MB; "
                     f"file: {p['file_bytes'] / 1e6:.2f} MB, {p['model_bpw']:.3f} bits per weight over all tensors")
    return "\n".join(lines)


def plot_plan(plan: Plan, path: str | Path, title: str = "") -> Path:
    """Heat map: layers (rows) x experts (columns), coloured by the expert's average bits per weight."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = plan.expert_bits()
    n_layers, n_experts = bits.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n_experts, 1.0 + 0.45 * n_layers))
    image = ax.imshow(bits, cmap="viridis", aspect="auto")
    for bid in plan.moe_layers:
        for xid in range(n_experts):
            types = {plan.experts[bid][xid][p] for p in PROJECTIONS}
            label = types.pop() if len(types) == 1 else "mixed"
            ax.text(xid, bid, label.replace("_", "\n", 1) if n_experts > 4 else label,
                    ha="center", va="center", fontsize=6, color="white" if bits[bid, xid] < np.nanmean(bits) else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers))
    ax.set_title(title or f"{plan.layout} plan, {plan.predicted.get('expert_bpw', 0):.2f} expert bpw", fontsize=9)
    fig.colorbar(image, ax=ax, label="bits per weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plan_of(info: dict) -> Plan:
    """A file's expert types (``gguf_io.inspect``'s ``experts``) as a Plan (for the heat map)."""
    return Plan(layout=str(info["mc"].get(keys.PLAN_LAYOUT, "stock")), experts=info["experts"], non_expert={},
                budget={}, predicted={"expert_bpw": info["expert_bpw"] or 0.0})
