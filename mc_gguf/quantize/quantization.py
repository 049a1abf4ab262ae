"""Quantize a checkpoint to a plan and write the GGUF, one expert in memory at a time.

Every expert projection is quantized by ggml's own quantizer (through
ctypes) at the type its plan gives, with the expert's importance matrix from
the calibration statistics, and optionally with GPTQ error compensation
(gptq.py) when the statistics hold what the experts' Hessians are built
from (hessian.py, one expert at a time), or GPTQ followed by
tuning of the K-quant integers and i-quant scales on those Hessians (tune.py). The file's layout follows
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
from mc_gguf.atomic import check_output_path
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.device import torch_device
from mc_gguf.errors import McGgufError
from mc_gguf.ggml import quants
from mc_gguf.ggml.types import quant_type, stored_type
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.convert import model_metadata
from mc_gguf.gguf_io.metadata import file_type_of
from mc_gguf.gguf_io.requirements import requirements
from mc_gguf.gguf_io.layout import PROJECTIONS, ExpertGroup, expert_groups, row_length
from mc_gguf.gguf_io.write import stack_one_at_a_time, write_gguf
from mc_gguf.hf.checkpoint import Checkpoint, open_checkpoint
from mc_gguf.prune import rule as pruning
from mc_gguf.quantize.gptq import Hessian, gptq_quantize
from mc_gguf.quantize.hessian import ExpertHessians
from mc_gguf.quantize.tune import TuneSettings, tune_quantize


def quantize(model_dir: str | Path, plan: Plan, out: str | Path, *, stats: CalibrationStats | None = None,
                   gptq: bool | None = None, tune: TuneSettings | None = None, odp: pruning.OdpParams | None = None,
                   progress: bool = True) -> Path:
    """Write ``out``: the checkpoint quantized to ``plan``. ``gptq`` defaults to on when ``stats`` has Hessians;
    ``tune`` (which starts from GPTQ) tunes the K-quant experts' integers on those Hessians."""
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

    tensors = layout_tensors(ckpt, plan, produce_group)
    measured = tensor_totals(tensors)

    odp_keys = pruning.odp_metadata(odp) if odp is not None else {}
    needs = requirements(gguf.MODEL_ARCH_NAMES[ckpt.arch.gguf_arch], (t.name for t in tensors), odp_keys)

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        model_metadata(ckpt, file_type_of(tensors))(writer)
        writer.add_uint32(keys.RUNTIME_PATCH_LEVEL, needs.patch_level)
        add_plan_metadata(writer, plan, measured, stats, gptq, tune)
        for key, value in odp_keys.items():
            writer.add_key_value(key, value.value, value.type, sub_type=value.sub_type)

    with bar:
        return write_gguf(out, gguf.MODEL_ARCH_NAMES[ckpt.arch.gguf_arch], add_metadata, tensors, progress=progress)


class ExpertQuantizer:
    """``experts(bid, xid, projection)``: ggml's bytes [rows, row_bytes] of one expert projection at the plan's
    type. With ``hessians``, by GPTQ (and, with ``tune``, tuned after it), the down projection fit to what
    the quantized gate and up give it (hessian.py's down_target); the current layer's gate and up bytes are
    kept for that until the next layer is asked for."""

    def __init__(self, ckpt: Checkpoint, plan: Plan, stats: CalibrationStats | None,
                 hessians: ExpertHessians | None = None, tune: TuneSettings | None = None):
        self.ckpt, self.plan, self.stats, self.hessians, self.tune = ckpt, plan, stats, hessians, tune
        self._bid: int | None = None
        self._kept: dict[tuple[int, str], np.ndarray] = {}
        self._input_hessian: tuple[int, int, Hessian] | None = None  # gate's, factored once, for up

    def __call__(self, bid: int, xid: int, projection: str) -> np.ndarray:
        if self.hessians is None:
            return self._quantize(bid, xid, projection)
        if bid != self._bid:
            self._bid, self._kept = bid, {}
        if projection == "down":
            gate, up = (self.dequantized(bid, xid, p) for p in ("gate", "up"))
            target = self.hessians.down_target(bid, xid, gate, up)
            return self._quantize(bid, xid, projection, target.weights, target.hessian)
        if (xid, projection) not in self._kept:
            self._kept[xid, projection] = self._quantize(bid, xid, projection)
        return self._kept[xid, projection]

    def dequantized(self, bid: int, xid: int, projection: str) -> np.ndarray:
        """The weights [rows, cols] llama.cpp computes with for a gate or up projection."""
        data = self(bid, xid, projection)
        cols = self.ckpt.expert_shape(bid, projection)[1]
        return quants.dequantize(data, self._qtype(bid, xid, projection), cols).reshape(-1, cols)

    def _qtype(self, bid: int, xid: int, projection: str) -> gguf.GGMLQuantizationType:
        return quant_type(self.plan.experts[bid][xid][projection]).qtype

    def _quantize(self, bid: int, xid: int, projection: str, weights: np.ndarray | None = None,
                  hessian: np.ndarray | None = None) -> np.ndarray:
        qtype = self._qtype(bid, xid, projection)
        if weights is None:
            weights = self.ckpt.expert_weight(bid, xid, projection)
        which = "mid" if projection == "down" else "in"
        imatrix = self.stats.layers[bid].imatrix(which)[xid] if self.stats is not None else None
        if self.hessians is None:
            return quants.quantize(weights, qtype, imatrix)
        if hessian is None:
            hessian = self._shared_input_hessian(bid, xid)
        if self.tune is not None:
            return tune_quantize(weights, hessian, qtype, imatrix, self.tune)
        return gptq_quantize(weights, hessian, qtype, imatrix)

    def _shared_input_hessian(self, bid: int, xid: int) -> Hessian:
        """The Hessian of gate's and up's input (the same matrix), built and factored once per expert."""
        if self._input_hessian is None or self._input_hessian[:2] != (bid, xid):
            self._input_hessian = None
            self._input_hessian = (bid, xid, Hessian(self.hessians(bid, xid, "in")))
        return self._input_hessian[2]


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
    writer.add_string(keys.PLAN_LAYOUT, plan.layout)
    n_expert = max(map(len, plan.experts))
    writer.add_array(keys.PLAN_TYPES, [plan.experts[bid][xid][p] if plan.experts[bid] else ""
                                       for bid in range(plan.n_layers) for p in PROJECTIONS for xid in range(n_expert)])
    writer.add_float32(keys.PLAN_BUDGET, float(plan.budget.get("bits", 0.0)))
    writer.add_string(keys.PLAN_SCOPE, str(plan.budget.get("scope", "experts")))
    writer.add_float32(keys.PLAN_EXPERT_BPW, float(measured["expert_bpw"]))
    writer.add_float32(keys.PLAN_MODEL_BPW, float(measured["model_bpw"]))
    writer.add_bool(keys.QUANTIZE_GPTQ, bool(gptq))
    writer.add_uint32(keys.QUANTIZE_TUNE_ITERS, tune.iters if tune is not None else 0)
    if plan.layout == "per-expert":
        writer.add_array(keys.EXPERT_GROUPS, group_map(plan))
    if stats is not None:
        writer.add_string(keys.CALIBRATION_MODEL, str(stats.info.get("model_name", "")))
        writer.add_string(keys.CALIBRATION_TEXT, str(stats.info.get("text", "")))
        writer.add_string(keys.CALIBRATION_TEXT_SHA256, str(stats.info.get("text_sha256", "")))
        writer.add_uint32(keys.CALIBRATION_TOKENS, int(stats.info.get("n_tokens", 0)))
