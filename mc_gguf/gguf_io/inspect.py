"""Read any GGUF (mc-gguf's or stock) and describe its tensor types, expert by expert, and its mc.* metadata."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mc_gguf.errors import GGUFFileError
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.edit import field_value, open_gguf
from mc_gguf.gguf_io.header import GGUFHeader, scan
from mc_gguf.gguf_io.layout import PROJECTIONS, group_map_problem, is_expert_weight
from mc_gguf.gguf_io.requirements import file_requirements, needed_patch_level
from mc_gguf.gguf_io.validate import file_kind, model_problem


def _count(header: GGUFHeader, key: str) -> int:
    value = header.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def inspect_gguf(path: str | Path) -> dict:
    """Everything ``mc-gguf inspect`` shows, as plain data."""
    reader = open_gguf(path)
    header = scan(path)
    kind = file_kind(header)
    problem = None if kind else model_problem(header)
    if problem:
        raise GGUFFileError(f"{path}: {problem}")
    arch = header.architecture
    tensors = {t.name: t for t in reader.tensors}
    n_layer = _count(header, f"{arch}.block_count")
    n_expert = _count(header, f"{arch}.expert_count")
    n_dense = _count(header, f"{arch}.leading_dense_block_count")
    try:
        group_map = keys.read(reader, keys.EXPERT_GROUPS)
    except GGUFFileError as exc:
        raise GGUFFileError(f"{path}: {exc} (the file is corrupt: llama.cpp refuses it)") from None
    if group_map is not None and n_expert:
        counts = {t.name: int(t.shape[-1]) for t in reader.tensors if is_expert_weight(t.name)}
        problem = group_map_problem(group_map, counts, n_layer, n_expert, n_dense)
        if problem:
            raise GGUFFileError(f"{path}: {problem} (the file is corrupt: llama.cpp refuses it)")
    experts = []
    for bid in range(n_layer if n_expert else 0):
        if bid < n_dense:
            experts.append([])  # a dense FFN, no experts
            continue
        layer = [dict() for _ in range(n_expert)]
        for p, projection in enumerate(PROJECTIONS):
            stacked = tensors.get(f"blk.{bid}.ffn_{projection}_exps.weight")
            if stacked is not None:
                for xid in range(n_expert):
                    layer[xid][projection] = stacked.tensor_type.name
                continue
            if group_map is None:
                continue
            group_of = group_map[(bid * 3 + p) * n_expert:(bid * 3 + p + 1) * n_expert]
            for xid, g in enumerate(group_of):
                t = tensors.get(f"blk.{bid}.ffn_{projection}_exps.g{g}.weight")
                layer[xid][projection] = t.tensor_type.name if t is not None else "missing"
        experts.append(layer)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    expert_tensors = [t for t in reader.tensors if is_expert_weight(t.name)]
    expert_weights = sum(int(t.n_elements) for t in expert_tensors)
    return {
        "path": str(path),
        "architecture": arch,
        "kind": kind or "model",
        "runs_in": None if kind else file_requirements(header).describe(),
        "patch_level": None if kind else needed_patch_level(header),
        "file_bytes": Path(path).stat().st_size,
        "n_tensors": len(reader.tensors),
        "bpw": 8 * n_bytes / n_weights if n_weights else 0.0,
        "expert_bpw": 8 * sum(int(t.n_bytes) for t in expert_tensors) / expert_weights if expert_weights else None,
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "tensors": [{"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in reversed(t.shape)]}
                    for t in reader.tensors],
        "experts": experts,
        # the per-expert keys are shown as the expert table above, not as lists
        "mc": {name: field_value(reader, name) for name in reader.fields if name.startswith("mc.")
               and not (name in keys.BY_NAME and keys.BY_NAME[name].bulky)},
    }


def describe(info: dict) -> str:
    kind = "" if info["kind"] == "model" else f" ({info['kind']})"
    lines = [f"{info['path']}{kind}: {info['architecture']}, {info['n_tensors']} tensors, "
             f"{info['file_bytes'] / 1e6:.2f} MB, {info['bpw']:.3f} bits per weight"
             + (f" (experts {info['expert_bpw']:.3f})" if info["expert_bpw"] else ""),
             "tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(info["tensor_types"].items()))]
    if info["runs_in"]:
        lines.append(info["runs_in"])
    for bid, layer in enumerate(info["experts"]):
        if not layer:
            lines.append(f"  blk.{bid}: dense FFN (no experts)")
        for projection in PROJECTIONS if layer else ():
            types = [expert.get(projection, "?") for expert in layer]
            lines.append(f"  blk.{bid} {projection:>4}: " + (types[0] + " (all)" if len(set(types)) == 1
                                                              else " ".join(types)))
    for key, value in info["mc"].items():
        shown = value if not isinstance(value, list) else [round(v, 4) if isinstance(v, float) else v for v in value]
        lines.append(f"  {key} = {shown}")
        lines.append(f"      {keys.meaning(key)}")
    return "\n".join(lines)
