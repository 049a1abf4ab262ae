"""A plan for people: a table of types per layer and a heat map of the bits of every expert."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mc_gguf.allocate.plan import Plan, non_expert_class
from mc_gguf.ggml.types import TYPES
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.layout import PROJECTIONS


def describe_plan(plan: Plan) -> str:
    bits = plan.expert_bits()
    size = plan.budget.get("size")
    budget = (f"a file of at most {size:,} bytes" if isinstance(size, int) else
              f"{plan.budget.get('bits')} bits per weight over {plan.budget.get('scope', 'experts')}")
    chosen = {non_expert_class(name) for name in plan.tensors}
    fixed = [f"{k} {v}" for k, v in plan.non_expert.items() if k not in chosen]
    lines = [f"layout {plan.layout}, budget {budget}"
             + (f"; non-expert tensors: {', '.join(fixed)}" if fixed else ""),
             f"{'layer':>5}  {'bpw':>5}  types of the expert projections (count)"]
    if plan.tensors:
        lines.insert(1, "chosen with the experts: " + describe_tensors(plan.tensors))
    for bid, layer in enumerate(plan.experts):
        if not layer:
            lines.append(f"{bid:>5}  {'-':>5}  dense FFN (no experts)")
            continue
        counts = Counter(expert[p] for expert in layer for p in PROJECTIONS)
        ordered = sorted(counts, key=list(TYPES).index)
        lines.append(f"{bid:>5}  {bits[bid].mean():5.2f}  " + ", ".join(f"{t} x{counts[t]}" for t in ordered))
    p = plan.predicted
    expert_bpw = types_bpw(plan)
    if p and abs(p.get("expert_bpw", 0.0) - expert_bpw) < 5e-4:
        lines.append(f"experts: {p['expert_bpw']:.3f} bits per weight, {p['expert_bytes'] / 1e6:.2f} MB; "
                     f"file: {p['file_bytes'] / 1e6:.2f} MB, {p['model_bpw']:.3f} bits per weight over all tensors")
    elif p:
        # the types were changed after allocate sized the plan: the experts' bytes scale with their bits (the
        # weights are the same), the rest of the file is as allocate sized it
        expert_bytes = p["expert_bytes"] * expert_bpw / p["expert_bpw"] if p.get("expert_bpw") else 0.0
        file_bytes = p["file_bytes"] - p["expert_bytes"] + expert_bytes
        lines.append(f"experts: {expert_bpw:.3f} bits per weight, {expert_bytes / 1e6:.2f} MB; file: about "
                     f"{file_bytes / 1e6:.2f} MB (the plan's stored sizes, {p['expert_bpw']:.3f} bits, were for "
                     "other types: it was edited after allocate)")
    else:
        lines.append(f"experts: {expert_bpw:.3f} bits per weight")
    return "\n".join(lines)


def describe_tensors(tensors: dict[str, str]) -> str:
    """"token_embd Q5_K, output Q5_K, attn_q IQ4_XS x4 Q3_K x2, ...": the other tensors' types, by kind."""
    kinds: dict[str, Counter] = {}
    for name, type_name in tensors.items():
        parts = name.split(".")
        kind = parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
        kinds.setdefault(kind, Counter())[type_name] += 1
    return ", ".join(f"{kind} " + " ".join(t if n == 1 and len(counts) == 1 else f"{t} x{n}"
                                            for t, n in sorted(counts.items(), key=lambda i: list(TYPES).index(i[0])))
                     for kind, counts in kinds.items())


def types_bpw(plan: Plan) -> float:
    """The experts' bits per weight that the plan's types give (every projection of an expert holds as many
    weights: gate and up [F, H], down [H, F])."""
    import numpy as np

    bits = plan.expert_bits()
    return float(np.nanmean(bits)) if np.isfinite(bits).any() else 0.0


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
    ax.set_title(title or f"{plan.layout} plan, {types_bpw(plan):.2f} expert bpw", fontsize=9)
    fig.colorbar(image, ax=ax, label="bits per weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plan_of(info: dict) -> Plan:
    """A file's expert types (``gguf_io.inspect``'s ``experts``) as a Plan (for the heat map)."""
    return Plan(layout=str(info["mc"].get(keys.PLAN_LAYOUT, "stock")), experts=info["experts"], non_expert={},
                budget={}, predicted={"expert_bpw": info["expert_bpw"] or 0.0})
