"""A layer's MoE block as calibration runs it: routing, the experts, and the statistics, in one pass.

It replaces transformers' MoE block inside the decoder layer (forward.py), so
every expert runs once per routed token: its intermediate activation z =
glu(x gate^T, x up^T) (SwiGLU, or gpt-oss's with biases) feeds the output and
the statistics alike. The
steps, as in Mixtral's MixtralSparseMoeBlock and llama.cpp's build_moe_ffn:

1. ``route``: router probabilities (softmax, or GLM4-MoE's sigmoid, of
   x W_r^T) over all experts, the top-k slots (chosen by the probabilities
   plus a selection bias where the family has one, within the best groups
   of experts where it has groups), and the weights the block applies (the
   slots' probabilities, renormalised to sum to 1 when the architecture says
   so, then times the routed scale: DeepSeek's routed_scaling_factor,
   build_moe_ffn's w_scale);
2. ``_run_experts``: per expert, its tokens' z and output, added into the
   block output with the slot's weight (as transformers' index_add_);
3. statistics: activation counts, summed routing probabilities, w_i / w_0 of
   every token, the importance matrices (sum of x^2 and of z^2), optionally
   every token's input and routing (what GPTQ's Hessians are built from,
   quantize/hessian.py), a seeded sample of (input, experts, weights) on which
   quantization errors are measured afterwards (quant_error.py), and the
   squared change of every token's block output if one of its slots were
   skipped (``skip_energy``: what Online Dynamic Pruning costs, prune/budget.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import gguf
import numpy as np
import torch
import torch.utils.checkpoint

from mc_gguf.calibrate.quant_error import EpsSample, ExpertWeights, expert_hidden, expert_output
from mc_gguf.calibrate.stats import LayerStats
from mc_gguf.hf.architectures import SharedExpert
from mc_gguf.hf.checkpoint import Checkpoint


@dataclass(frozen=True)
class Router:
    """A layer's router: its weight [E, H] (float32), the selection bias [E] added to the probabilities
    for choosing the slots only (DeepSeek-V3 and GLM4-MoE's e_score_correction_bias, llama.cpp's
    exp_probs_b) or None, and the bias [E] added to its logits (gpt-oss, llama.cpp's ffn_gate_inp.bias) or None."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class RoutingRule:
    """How a family's routers turn probabilities into slots and weights, as llama.cpp's build_moe_ffn does
    (gating_op, the expert groups of n_expert_groups / n_group_used, norm_w, w_scale)."""
    n_used: int
    norm_topk_prob: bool
    gating: gguf.ExpertGatingFuncType = gguf.ExpertGatingFuncType.SOFTMAX
    scale: float = 1.0
    n_group: int = 1      # experts in n_group groups of which the topk_group best (by the sum of their
    topk_group: int = 1   # two best choice scores) are eligible

    @classmethod
    def of(cls, ckpt: Checkpoint) -> RoutingRule:
        return cls(ckpt.n_experts_used, ckpt.norm_topk_prob, ckpt.arch.gating, ckpt.routed_scale,
                   *ckpt.expert_groups)


@dataclass
class Routing:
    probs: torch.Tensor    # [n, E] the router's probabilities (softmax or sigmoid) of all experts
    top_w: torch.Tensor    # [n, k] the chosen slots' probabilities, descending
    top_ids: torch.Tensor  # [n, k] their experts
    applied: torch.Tensor  # [n, k] the weights the block multiplies the expert outputs with

    def routed(self) -> torch.Tensor:
        """[n, E] bool: is expert e among token t's top-k."""
        return torch.zeros_like(self.probs, dtype=torch.bool).scatter_(1, self.top_ids, True)


class StatisticsMoE(torch.nn.Module):
    """The MoE block of one layer, computing its output and accumulating its statistics.

    A shared expert (``shared``: how the row's adds up) adds its output to the routed experts'; it is
    neither counted nor skipped, and the skip costs are those of the routed part's change. ``returns_scores``:
    the block returns (output, None), as the decoder layers of transformers' blocks that return (output, router
    scores) unpack it (GptOssMLP). ``inputs`` [tokens, H] (a memory map, say) receives every token's input, in
    order, and the block keeps every token's experts and applied weights (calibrate --hessian)."""

    def __init__(self, router: Router, experts: Sequence[ExpertWeights], glu: Callable, rule: RoutingRule,
                 eps_positions: np.ndarray, inputs: np.ndarray | None = None,
                 shared: SharedExpert | None = None,
                 returns_scores: bool = False):
        super().__init__()
        self.shared = shared
        self.returns_scores = returns_scores
        n_expert = len(experts)
        ff, hidden = experts[0].gate.shape
        self.experts = experts               # in the checkpoint's dtype (forward.LayerExperts: read when used)
        self.router = router
        self.glu = glu
        self.rule = rule
        self.n_used = rule.n_used
        self.eps_positions = eps_positions   # flat token indices (sequence-major) of the eps sample
        self.seen = 0                        # tokens processed so far, in that order
        self.recording = True                # gather statistics of the tokens run (paused: not)
        # run for a backward (calibrate/fisher.py), statistics paused: each expert's output is computed again in
        # the backward instead of its activations and weights being kept, so one expert is in memory then too
        self.recompute_experts = False
        self.count = np.zeros(n_expert, dtype=np.int64)
        self.weight_sum = np.zeros(n_expert, dtype=np.float64)
        self.imatrix_in = torch.zeros(n_expert, hidden, dtype=torch.float64)
        self.imatrix_mid = torch.zeros(n_expert, ff, dtype=torch.float64)
        # sum of a^2 y and of a^2 over each expert's slots i >= 1 (a: the weight applied): skip_mean's parts
        self.skip_sum = torch.zeros(n_expert, hidden, dtype=torch.float64)
        self.skip_weight = torch.zeros(n_expert, dtype=torch.float64)
        self.inputs = inputs
        self.routed: list[tuple[np.ndarray, np.ndarray]] = []
        self.ratios: list[np.ndarray] = []
        self.slot_experts: list[np.ndarray] = []
        self.skip_energies: list[np.ndarray] = []
        self.drop_energies: list[np.ndarray] = []
        self.samples: list[EpsSample] = []

    def route(self, x: torch.Tensor) -> Routing:
        rule = self.rule
        logits = x @ self.router.weight.T
        if self.router.logit_bias is not None:
            logits = logits + self.router.logit_bias
        sigmoid = rule.gating == gguf.ExpertGatingFuncType.SIGMOID
        probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
        choice = probs if self.router.bias is None else probs + self.router.bias
        if rule.n_group > 1:
            groups = choice.reshape(len(x), rule.n_group, -1)
            best = torch.topk(groups.topk(2, dim=-1).values.sum(-1), rule.topk_group, dim=-1).indices
            eligible = torch.zeros(groups.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, best, True)
            choice = groups.masked_fill(~eligible[..., None], -torch.inf).reshape(len(x), -1)
        top_ids = torch.topk(choice, self.n_used, dim=-1).indices
        # slots by descending weight: with a selection bias the best choice need not have the top weight
        top_w, order = probs.gather(1, top_ids).sort(dim=-1, descending=True)
        top_ids = top_ids.gather(1, order)
        applied = top_w / top_w.sum(-1, keepdim=True) if rule.norm_topk_prob else top_w
        return Routing(probs, top_w, top_ids, applied * rule.scale if rule.scale != 1.0 else applied)

    @contextmanager
    def paused(self):
        """The block gives its output without gathering statistics (tokens run again, calibrate/tensors.py)."""
        self.recording = False
        try:
            yield self
        finally:
            self.recording = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).float()
        routing = self.route(x)
        routed = routing.routed()
        if self.recording:
            self._count_routing(routing, routed)
        out = self._run_experts(x, routing, routed, record=self.recording)
        if self.shared is not None:
            out = out + self.shared.output(self, x)
        if self.recording:
            self._keep_eps_sample(x, routing)
            if self.inputs is not None:
                self.inputs[self.seen:self.seen + len(x)] = x.cpu().numpy()
                self.routed.append((routing.top_ids.to(torch.int32).cpu().numpy(), routing.applied.cpu().numpy()))
            self.seen += len(x)
        return (out.reshape(shape), None) if self.returns_scores else out.reshape(shape)

    def _count_routing(self, routing: Routing, routed: torch.Tensor) -> None:
        self.count += routed.sum(0).cpu().numpy()
        self.weight_sum += (routing.probs * routed).sum(0).double().cpu().numpy()
        self.ratios.append((routing.top_w[:, 1:] / routing.top_w[:, :1]).cpu().numpy())
        self.slot_experts.append(routing.top_ids[:, 1:].to(torch.int16).cpu().numpy())

    def _run_experts(self, x: torch.Tensor, routing: Routing, routed: torch.Tensor, record: bool = True
                     ) -> torch.Tensor:
        """The experts' part of the block's output; with ``record``, their statistics of these tokens gathered."""
        out = torch.zeros_like(x)
        # each token's unweighted expert output in slots 1 .. k-1 (slot 0 is never skipped)
        slot_out = torch.zeros(x.shape[0], self.n_used - 1, x.shape[1], device=x.device) if record else None
        for e in range(len(self.experts)):
            tokens = routed[:, e].nonzero().squeeze(-1)
            if len(tokens) == 0:
                continue
            xe = x[tokens]
            in_slot = routing.top_ids[tokens] == e
            slot_weight = (routing.applied[tokens] * in_slot).sum(-1, keepdim=True)
            if self.recompute_experts:  # for a backward: read again there rather than kept for it
                y = torch.utils.checkpoint.checkpoint(self._expert_output, xe, e, use_reentrant=False)
                out = out.index_add(0, tokens, y * slot_weight)
                continue
            weights = self.experts[e].float32().to(x.device)  # one expert read and widened at a time
            z = expert_hidden(xe, weights, self.glu)
            y = expert_output(z, weights)
            out.index_add_(0, tokens, y * slot_weight)
            if not record:
                continue
            self.imatrix_in[e] += _sum_of_squares(xe)
            self.imatrix_mid[e] += _sum_of_squares(z)
            for slot in range(1, self.n_used):
                mine = in_slot[:, slot]
                slot_out[tokens[mine], slot - 1] = y[mine]
                a2 = routing.applied[tokens[mine], slot] ** 2  # float32: MPS has no float64
                self.skip_sum[e] += (a2[:, None] * y[mine]).sum(0).cpu().double()
                self.skip_weight[e] += float(a2.sum())
        if not record:
            return out
        self.skip_energies.append(skip_energy(out, slot_out, routing.applied, self.rule.norm_topk_prob,
                                              self.rule.scale))
        self.drop_energies.append(skip_energy(out, slot_out, routing.applied, False))
        return out

    def _expert_output(self, x: torch.Tensor, e: int) -> torch.Tensor:
        weights = self.experts[e].float32().to(x.device)
        return expert_output(expert_hidden(x, weights, self.glu), weights)

    def _keep_eps_sample(self, x: torch.Tensor, routing: Routing) -> None:
        first = self.seen
        chosen = self.eps_positions[(self.eps_positions >= first) & (self.eps_positions < first + len(x))] - first
        self.samples.append(EpsSample(x[chosen], routing.top_ids[chosen], routing.applied[chosen]))

    def eps_sample(self) -> EpsSample:
        return EpsSample(*(torch.cat([getattr(s, f) for s in self.samples]) for f in ("x", "ids", "weights")))

    def layer_stats(self, n_types: int) -> LayerStats:
        """The statistics gathered so far; eps (filled in afterwards) zero, skip_cost the skip energies
        (calibration.py divides them by the squared norm of each token's output hidden state)."""
        return LayerStats(
            count=self.count, weight_sum=self.weight_sum, top_ratio=np.concatenate(self.ratios).astype(np.float32),
            skip_cost=np.concatenate(self.skip_energies).astype(np.float32),
            drop_cost=np.concatenate(self.drop_energies).astype(np.float32),
            slot_experts=np.concatenate(self.slot_experts),
            skip_mean=(self.skip_sum / self.skip_weight.clamp_min(1e-30)[:, None]).float().numpy(),
            imatrix_in=self.imatrix_in.float().numpy(), imatrix_mid=self.imatrix_mid.float().numpy(),
            eps=np.zeros((3, len(self.experts), n_types)),
            routed_ids=np.concatenate([ids for ids, _ in self.routed]) if self.inputs is not None else None,
            routed_weights=(np.concatenate([w for _, w in self.routed]).astype(np.float32)
                            if self.inputs is not None else None),
        )


def skip_energy(out: torch.Tensor, slot_out: torch.Tensor, applied: torch.Tensor, renormalise: bool,
                scale: float = 1.0) -> np.ndarray:
    """[n, k-1]: ||change of the block output||^2 of each token if its slot i >= 1 alone were skipped.

    With renormalised weights a (Mixtral; the runtime's ODP renormalises what it keeps, then scales) the block
    gives out = s sum_j a_j y_j, and without slot i s sum_{j != i} a_j y_j / (1 - a_i): the change is
    a_i / (1 - a_i) * (out - s y_i). Without renormalisation the change is -s a_i y_i (``applied`` is s a).
    """
    if renormalise:
        a = applied[:, 1:, None] / scale
        change = a / (1 - a).clamp_min(1e-12) * (out[:, None, :] - scale * slot_out)
    else:
        change = applied[:, 1:, None] * slot_out
    return (change ** 2).sum(-1).cpu().numpy()


def _sum_of_squares(values: torch.Tensor) -> torch.Tensor:
    """(values ** 2).sum(0) on the CPU in float64 (squared and summed on the device, in float64 where it has it:
    MPS has no float64)."""
    wide = values if values.device.type == "mps" else values.double()
    return (wide ** 2).sum(0).cpu().double()
