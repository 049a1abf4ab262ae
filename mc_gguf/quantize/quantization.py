"""Quantize a checkpoint to a plan and write the GGUF, one expert in memory at a time.

Every expert projection is quantized by ggml's own quantizer (through
ctypes) at the type its plan gives, with the expert's importance matrix from
the calibration statistics, and optionally with GPTQ error compensation
(gptq.py) when the statistics hold what the experts' Hessians are built
from (hessian.py, one expert at a time), or GPTQ followed by
tuning of the K-quant integers and i-quant scales on those Hessians (tune.py); the
other weight matrices alike where the calibration kept their Hessians (tensors.py). The file's layout follows
the plan: ``stock`` (one type per layer and projection, loads in unmodified
llama.cpp) or ``per-expert`` (groups of equal type, see gguf_io/layout.py and
docs/FORMAT.md).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from mc_gguf.allocate.plan import Plan, PlanFileError, validate_plan
from mc_gguf.allocate.size import layout_tensors, tensor_totals
from mc_gguf.atomic import check_output_path, work_folder
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.device import torch_device
from mc_gguf.errors import McGgufError
from mc_gguf.ggml.types import quant_type, stored_type
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.convert import model_metadata
from mc_gguf.gguf_io.metadata import file_type_of
from mc_gguf.gguf_io.requirements import requirements
from mc_gguf.gguf_io.layout import PROJECTIONS, ExpertGroup, expert_groups, row_length
from mc_gguf.gguf_io.write import stack_one_at_a_time, write_gguf
from mc_gguf.hf.checkpoint import Checkpoint, open_checkpoint
from mc_gguf.prune import rule as pruning
from mc_gguf.prune.means import carries_means, mean_tensors
from mc_gguf.quantize.experts import ExpertQuantizer
from mc_gguf.quantize.hessian import ExpertHessians
from mc_gguf.quantize.tensors import TensorEncoder
from mc_gguf.quantize.tune import TuneSettings


def quantize(model_dir: str | Path, plan: Plan, out: str | Path, *, stats: CalibrationStats | None = None,
             gptq: bool | None = None, tune: TuneSettings | None = None, odp: pruning.OdpParams | None = None,
             ray: str | None = None, work: str | Path | None = None, progress: bool = True) -> Path:
    """Write ``out``: the checkpoint quantized to ``plan``. ``gptq`` defaults to on when ``stats`` has Hessians;
    ``tune`` (which starts from GPTQ) tunes the K-quant experts' integers on those Hessians.

    ``ray``: the address of a Ray cluster ("auto": the one this machine belongs to) whose workers quantize the
    experts (cluster.py); their results are kept in ``work`` (default: atomic.work_folder(out)) until the file is
    written, so that the same call started again resumes."""
    out = check_output_path(out, inputs=[model_dir])
    if tune is not None:
        torch_device(tune.device)
    validate_plan(plan)
    ckpt = open_checkpoint(model_dir)
    _check_fits(ckpt, plan, stats)
    if gptq is None:
        gptq = tune is not None or (stats is not None and stats.has_hessian)
    if tune is not None and not gptq:
        raise McGgufError("tuning starts from GPTQ: leave GPTQ on")
    if gptq and (stats is None or not stats.has_hessian):
        raise McGgufError(f"{'tuning' if tune else 'GPTQ'} needs the experts' Hessians: calibrate with --hessian")
    if odp is not None:
        pruning.validate_params(odp.mu, odp.protect_ratio, ckpt.n_layers, odp.mu_exps, ckpt.n_experts)

    if ray is not None:
        from mc_gguf.quantize.cluster import ClusterExperts, ExpertJob
        from mc_gguf.ray_cluster import check_device, connect

        if tune is not None:
            check_device(tune.device)
        job = ExpertJob.of(ckpt.path, plan, stats, gptq, tune)
        connect(ray)
        folder = Path(work or work_folder(out)) / f"experts-{job.digest}"
        experts = ClusterExperts(job, ckpt.moe_layers, ckpt.n_experts, folder)
    else:
        device = tune.device if tune is not None else "cpu"
        experts = ExpertQuantizer(ckpt, plan, stats, ExpertHessians(ckpt, stats, device) if gptq else None, tune)
    # GPTQ and tuning take minutes per expert at Mixtral's shapes: a bar of expert projections with the time left,
    # beside the writer's bar of bytes, which moves once per tensor
    n_tensors = sum(len(layer) for layer in plan.experts) * len(PROJECTIONS)
    bar = tqdm(total=n_tensors, desc="tuning" if tune is not None else "GPTQ", unit="tensor", position=1,
               leave=False, disable=not (progress and gptq), dynamic_ncols=True)

    def one(bid: int, xid: int, projection: str) -> np.ndarray:
        bar.set_postfix_str(f"layer {bid + 1}/{ckpt.n_layers} expert {xid} {projection}", refresh=True)
        data = experts(bid, xid, projection)
        bar.update(1)
        return data

    def produce_group(bid: int, projection: str, group: ExpertGroup) -> np.ndarray:
        return stack_one_at_a_time(len(group.experts), lambda i: one(bid, group.experts[i], projection))

    # the other tensors with their importance matrices where the calibration measured them (calibrate/tensors.py),
    # by GPTQ and tuning on their Hessians as the experts
    tensors = layout_tensors(ckpt, plan, produce_group, TensorEncoder(stats, gptq, tune))
    measured = tensor_totals(tensors)
    arch_name = gguf.MODEL_ARCH_NAMES[ckpt.arch.gguf_arch]
    if odp is not None and stats is not None and carries_means(arch_name, (t.name for t in tensors)):
        tensors = [*tensors, *mean_tensors(stats, odp)]  # pruning's mean outputs (prune/means.py)

    odp_keys = pruning.odp_metadata(odp) if odp is not None else {}
    needs = requirements(arch_name, (t.name for t in tensors), odp_keys)

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        model_metadata(ckpt, file_type_of(tensors))(writer)
        keys.write(writer, keys.RUNTIME_PATCH_LEVEL, needs.patch_level)
        add_plan_metadata(writer, plan, measured, stats, gptq, tune)
        for key, value in odp_keys.items():
            writer.add_key_value(key, value.value, value.type, sub_type=value.sub_type)

    with bar:
        path = write_gguf(out, arch_name, add_metadata, tensors, progress=progress)
    if ray is not None:
        experts.remove()
    return path


def _check_fits(ckpt: Checkpoint, plan: Plan, stats: CalibrationStats | None) -> None:
    hidden, ff = ckpt.expert_dims
    if plan.n_layers != ckpt.n_layers:
        raise PlanFileError(f"the plan is for {plan.n_layers} layers; {ckpt.path} has {ckpt.n_layers}")
    for bid, layer in enumerate(plan.experts):
        if len(layer) != (ckpt.n_experts if ckpt.is_moe(bid) else 0):
            raise PlanFileError(f"the plan gives layer {bid} {len(layer)} experts; {ckpt.path} has "
                                + (f"{ckpt.n_experts} in every MoE layer" if ckpt.is_moe(bid) else
                                   "a dense FFN there (no experts)"))
        for xid, expert in enumerate(layer):
            for projection, name in expert.items():
                length = row_length(projection, hidden, ff)
                stored = stored_type(name, length)
                if stored != quant_type(name):
                    raise PlanFileError(
                        f"the plan gives layer {bid} expert {xid} {projection} {name}, whose blocks of "
                        f"{quant_type(name).block_size} do not divide its rows of {length} weights; "
                        f"llama-quantize would store it as {stored.name}")
    if stats is not None and not stats.measured_on(ckpt):
        raise McGgufError(f"the statistics are for another model than {ckpt.path}")
    if stats is None:
        needing = sorted({t for layer in plan.experts for e in layer for t in e.values()
                          if quant_type(t).needs_imatrix})
        if needing:
            raise McGgufError(f"{', '.join(needing)} need an importance matrix: pass the calibration statistics")


def group_map(plan: Plan) -> list[int]:
    """mc.experts.groups: the group of every (layer, projection, expert), in gguf_io/layout.py's group order;
    0 in the rows of dense layers, which the runtime does not read."""
    values = []
    n_expert = max(map(len, plan.experts))
    for bid in range(plan.n_layers):
        if not plan.experts[bid]:
            values.extend([0] * len(PROJECTIONS) * n_expert)
            continue
        for projection in PROJECTIONS:
            types = plan.projection_types(bid, projection)
            group_of_type = {group.type_name: g for g, group in enumerate(expert_groups(types))}
            values.extend(group_of_type[t] for t in types)
    return values


def add_plan_metadata(writer: gguf.GGUFWriter, plan: Plan, measured: dict, stats: CalibrationStats | None,
                      gptq: bool, tune: TuneSettings | None = None) -> None:
    n_expert = max(map(len, plan.experts))
    values = {
        keys.PLAN_LAYOUT: plan.layout,
        keys.PLAN_TYPES: [plan.experts[bid][xid][p] if plan.experts[bid] else ""
                          for bid in range(plan.n_layers) for p in PROJECTIONS for xid in range(n_expert)],
        keys.PLAN_BUDGET: plan.budget.get("bits", 0.0),
        keys.PLAN_SCOPE: plan.budget.get("scope", "experts"),
        keys.PLAN_EXPERT_BPW: measured["expert_bpw"],
        keys.PLAN_MODEL_BPW: measured["model_bpw"],
        keys.QUANTIZE_GPTQ: gptq,
        keys.QUANTIZE_TUNE_ITERS: tune.iters if tune is not None else 0,
    }
    if plan.layout == "per-expert":
        values[keys.EXPERT_GROUPS] = group_map(plan)
    if stats is not None:
        values |= {keys.CALIBRATION_MODEL: stats.info.get("model_name", ""),
                   keys.CALIBRATION_TEXT: stats.info.get("text", ""),
                   keys.CALIBRATION_TEXT_SHA256: stats.info.get("text_sha256", ""),
                   keys.CALIBRATION_TOKENS: stats.info.get("n_tokens", 0)}
    for name, value in values.items():
        keys.write(writer, name, value)
