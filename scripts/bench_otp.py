#!/usr/bin/env python3
"""Learned pruning thresholds (MC#'s Online Top-any Pruning, open form) against the sensitivity rules.

MC# learns which experts a token may drop. The open form measured here
(../shared/METHOD.md): per-layer, or per-layer-and-expert, thresholds on
w_i / w_0 trained on the calibration text through a Gumbel-sigmoid relaxation
of the keep/skip decision, minimising the KL divergence of the final logits
from the unpruned model plus lambda times the share of slots kept. Two
trainings: the relaxed mask itself (``gumbel``), and the hard mask in the
forward pass with the relaxed one's gradient (``straight-through``), where
lambda follows the skipped share towards the target. The model is trained
whole in memory (the bench model is 50 MB): this measures whether learning
pays, it is not how `mc-gguf odp-calibrate` runs.

Against them, the thresholds `odp-calibrate` chooses from the same
calibration text: ``sensitivity`` (per layer and expert) and
``sensitivity-layer``. Every method is evaluated through the transformers
reference of the runtime's rule (prune/reference.py, the protection of 2%
included) at the same skipped shares: each method's thresholds are scaled by
one common factor so that it skips exactly the target share of the scored
windows' slots. Reported on the evaluation windows and on the next windows of
the evaluation text (held out from everything, scaling included): the
perplexity change, mean KL divergence and same-top-token rate against the
unpruned model. The weights a token keeps are left as they are, as
odp-calibrate leaves them by default (--renormalize: renormalised, the
paper's rule), in training and evaluation alike. Prints one JSON object.

    python scripts/bench_otp.py [--steps 160] [--skips 0.25 0.35] [--json otp.json]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import add_input_flags, add_output_flags, add_window_flags, emit_json
from bench_odp import text_windows

from mc_gguf.calibrate.text import read_text
from mc_gguf.prune.calibration import odp_from_stats, router_statistics
from mc_gguf.prune.reference import TransformersOdp


class SoftGate:
    """Relaxed pruning in every MoE layer's router: slot i >= 1 is kept with weight
    m = sigmoid((log(w_i / w_0) - t + g) / tau), t the log-threshold of the layer (and expert), g logistic
    noise (Gumbel-sigmoid); the kept weights renormalised (``renormalize``) or left as they are."""

    def __init__(self, model, log_mu, tau: float, straight_through: bool, renormalize: bool):
        import torch

        self.model, self.log_mu, self.tau, self.straight_through = model, log_mu, tau, straight_through
        self.renormalize = renormalize
        self.kept_soft: list = []
        self.kept_hard: list = []
        self._saved = []
        self._torch = torch

    def __enter__(self) -> SoftGate:
        for il, layer in enumerate(self.model.model.layers):
            router = layer.mlp.gate
            self._saved.append((router, router.forward))
            router.forward = self._forward(il, router.forward)
        return self

    def __exit__(self, *exc) -> None:
        for router, forward in self._saved:
            router.forward = forward

    def _forward(self, il: int, route):
        torch = self._torch

        def forward(hidden_states):
            logits, w, ids = route(hidden_states)
            log_ratio = torch.log(w / w.max(-1, keepdim=True).values)
            margin = log_ratio - self.log_mu[il][ids]
            uniform = torch.rand_like(margin).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((margin + torch.log(uniform) - torch.log1p(-uniform)) / self.tau)
            hard = (margin >= 0).float()
            m = hard + soft - soft.detach() if self.straight_through else soft
            top = log_ratio >= 0
            m = torch.where(top, torch.ones_like(m), m)
            self.kept_soft.append(soft[~top].mean())
            self.kept_hard.append(float(hard[~top].mean()))
            kept = w * m
            return logits, kept / kept.sum(-1, keepdim=True) if self.renormalize else kept, ids

        return forward


def kl_rows(ref_logp, logp):
    """KL(reference || model) of every position [n]."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def train(model, windows, teacher, n_experts: int, init_mu: np.ndarray, per_expert: bool, straight_through: bool,
          steps: int, target: float, n_used: int, renormalize: bool, lam: float = 0.02, lr: float = 0.05,
          tau: float = 0.5, seed: int = 0) -> np.ndarray:
    """Learned thresholds [layers, experts], starting from ``init_mu`` [layers, experts]."""
    import torch

    torch.manual_seed(seed)
    n_layers = len(model.model.layers)
    start = torch.log(torch.tensor(init_mu, dtype=torch.float32).clamp(1e-3, 1.0))
    delta = torch.zeros(n_layers, n_experts if per_expert else 1, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)
    skippable = (n_used - 1) / n_used
    for step in range(steps):
        i = step % len(windows)
        gate = SoftGate(model, start + delta.expand(n_layers, n_experts), tau, straight_through, renormalize)
        with gate:
            logp = torch.log_softmax(model(torch.tensor([windows[i]])).logits[0].float(), -1)
        loss = kl_rows(teacher[i], logp).mean() + lam * torch.stack(gate.kept_soft).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if straight_through:  # lambda follows the skipped share of the hard mask towards the target
            share = (1 - float(np.mean(gate.kept_hard))) * skippable
            lam = max(0.0, lam + 0.05 * (target - share))
    return (start + delta.detach().expand(n_layers, n_experts)).exp().clamp(0.0, 1.0).numpy()


def evaluate(model, windows, teacher, mu_exps: np.ndarray, scale: float, protect_ratio: float,
             renormalize: bool) -> dict:
    """The reference rule with thresholds ``mu_exps * scale``: skipped share, perplexity change (second half of
    each window scored, as llama-perplexity), mean KL divergence and same top token against the unpruned."""
    import torch

    rows = np.clip(mu_exps * scale, 0.0, 1.0)
    nll = nll_ref = kl = same = n = 0.0
    with TransformersOdp(model, rows.max(-1), protect_ratio, rows.tolist(), renormalize) as odp, torch.no_grad():
        for ids, ref in zip(windows, teacher):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            half = len(ids) // 2
            target = torch.tensor(ids[half + 1:])
            nll += -logp[half:-1].gather(-1, target[:, None]).sum().item()
            nll_ref += -ref[half:-1].gather(-1, target[:, None]).sum().item()
            kl += kl_rows(ref[half:-1], logp[half:-1]).sum().item()
            same += (ref[half:-1].argmax(-1) == logp[half:-1].argmax(-1)).sum().item()
            n += len(target)
    return {"skipped_share": odp.counts.skipped_share, "ppl_change": math.exp((nll - nll_ref) / n) - 1,
            "kld_mean": kl / n, "same_top_token": same / n,
            "skipped_share_per_layer": [round(s / (s + c), 4) for s, c in zip(odp.counts.skipped, odp.counts.computed)]}


def scale_for_share(model, windows, mu_exps: np.ndarray, share: float, protect_ratio: float,
                    renormalize: bool) -> float:
    """The common factor on the thresholds that skips ``share`` of the slots of ``windows`` (bisection on its
    logarithm; the skipped share grows with it)."""
    import torch

    low, high = -4.0, 4.0
    for _ in range(13):
        middle = (low + high) / 2
        rows = np.clip(mu_exps * math.exp(middle), 0.0, 1.0)
        with TransformersOdp(model, rows.max(-1), protect_ratio, rows.tolist(), renormalize) as odp, torch.no_grad():
            for ids in windows:
                model.model(torch.tensor([ids]))
        low, high = (middle, high) if odp.counts.skipped_share < share else (low, middle)
    return math.exp((low + high) / 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_flags(parser, model_help="Hugging Face model folder (Mixtral family)")
    add_window_flags(parser, "evaluation windows, and held-out windows after them")
    parser.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default: 8192)")
    parser.add_argument("--steps", type=int, default=160, help="training steps, one calibration window each "
                        "(default: 160)")
    parser.add_argument("--skips", type=float, nargs="+", default=[0.25, 0.35], help="skip shares (default: 0.25 0.35)")
    parser.add_argument("--protect-ratio", type=float, default=0.02, help="protected prompt share (default: 0.02)")
    parser.add_argument("--renormalize", action="store_true",
                        help="renormalise the weights a token keeps (the paper's rule; default: left as they are, as "
                        "odp-calibrate's default)")
    add_output_flags(parser, "build/bench-otp", "where the router statistics go")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    calib = read_text(args.calib)
    stats = router_statistics(args.model, calib, workdir, n_tokens=args.calib_tokens, seq_len=args.ctx)
    n_used, n_experts = int(stats.info["n_expert_used"]), stats.n_experts

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    def unpruned(windows):
        with torch.no_grad():
            return [torch.log_softmax(model(torch.tensor([w])).logits[0].float(), -1) for w in windows]

    train_windows = text_windows(tokenizer, args.calib, args.ctx, args.calib_tokens // args.ctx)
    scored = text_windows(tokenizer, args.eval, args.ctx, 2 * args.windows)
    eval_windows, held_windows = scored[:args.windows], scored[args.windows:]
    train_teacher, eval_teacher, held_teacher = (unpruned(w) for w in (train_windows, eval_windows, held_windows))

    pruning = (args.protect_ratio, args.renormalize)
    result = {"model": args.model, "renormalize": args.renormalize, "windows": args.windows,
              "held_out_windows": len(held_windows), "calibration_tokens": args.calib_tokens, "steps": args.steps, "methods": {}}
    for skip in args.skips:
        chosen = {rule: odp_from_stats(stats, skip, args.protect_ratio, rule, args.renormalize)
                  for rule in ("sensitivity", "sensitivity-layer")}
        methods = {"sensitivity": np.array(chosen["sensitivity"].mu_exps),
                   "sensitivity-layer": np.repeat(np.array(chosen["sensitivity-layer"].mu)[:, None], n_experts, 1)}
        seconds = {}
        for name, per_expert, straight in (("otp gumbel per expert", True, False), ("otp gumbel per layer", False, False),
                                           ("otp straight-through per expert", True, True)):
            started = time.perf_counter()
            methods[name] = train(model, train_windows, train_teacher, n_experts, methods["sensitivity-layer"],
                                  per_expert, straight, args.steps, skip, n_used, args.renormalize)
            seconds[name] = round(time.perf_counter() - started, 1)
        for name, mu_exps in methods.items():
            scale = scale_for_share(model, eval_windows, mu_exps, skip, *pruning)
            row = {"eval": evaluate(model, eval_windows, eval_teacher, mu_exps, scale, *pruning),
                   "held_out": evaluate(model, held_windows, held_teacher, mu_exps, scale, *pruning),
                   "scale": round(scale, 4), "train_seconds": seconds.get(name, 0.0)}
            result["methods"][f"{name} {skip:g}"] = row
            print(f"{name} {skip:g}: eval ppl {row['eval']['ppl_change']:+.4f} kld {row['eval']['kld_mean']:.5f}, "
                  f"held-out ppl {row['held_out']['ppl_change']:+.4f} kld {row['held_out']['kld_mean']:.5f}",
                  file=sys.stderr, flush=True)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
