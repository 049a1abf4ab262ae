"""fisher(...) -> Fisher: how much the next token's distribution feels a change of the residual stream at
each point where a layer adds to it, so that errors measured at different depths are priced alike.

The allocation adds up squared output errors (eps, the other tensors' errors) as if a change of the residual
stream cost the same wherever it is made. It does not: on the bench model a change after the first layer's
attention, where the residual stream is still small, costs 8 to 15 times what the same change costs elsewhere.
The KL divergence between the distributions before and after a small change d of the residual stream at a point
is 1/2 d^T F d, F the Fisher information of the next token's distribution with respect to the stream there,
F = E_{y ~ p} g g^T with g = grad log p(y). For a change of no preferred direction that is 1/2 |d|^2 tr(F) / H,
and tr(F) = E |g|^2: the squared gradient of the log-probability of a token drawn from the model's own
distribution (drawn here by inverse CDF from seeded uniforms), averaged over the first tokens of the calibration.

Streamed as the forward is: the calibration keeps the input of every layer for the first few sequences
(workdir.py), then the gradient starts at the output head and goes back one layer at a time, each layer read from
the checkpoint again and run forward with gradients, its experts one at a time (moe.py recomputes each in the
backward instead of keeping it), the gradient after its attention read at the input of the norm before its MoE
block (the architecture's ``moe_input_norm``). At Mixtral 8x7B's shapes on 2 cores that is 56 s a layer for 4096
tokens, 3.6x the forward of the same tokens (a second read of the weights included); the kept inputs are 64 MB a
layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from mc_gguf.calibrate.forward import checkpoint_weights, decoder_layer, layer_runner, load_experts
from mc_gguf.calibrate.moe import RoutingRule, StatisticsMoE
from mc_gguf.calibrate.stats import Fisher
from mc_gguf.errors import CheckpointError
from mc_gguf.hf.checkpoint import Checkpoint

SEQUENCES_PER_STEP = 1  # sequences run forward and back at once (bounds the activations kept for the backward)
HEAD_ROWS = 64          # positions whose logits are made at a time (a vocabulary of 200k: 100 MB in float64)


def sample_labels(logits: torch.Tensor, seed: int, first: int = 0) -> torch.Tensor:
    """One token per row of ``logits`` [n, V] (positions first .. first + n - 1 of a sequence), drawn from its
    softmax by inverse CDF from the sequence's seeded uniforms (a reference computing the same logits, in one piece
    or in others, draws the same tokens)."""
    uniforms = np.random.default_rng(seed).random(first + len(logits))[first:]
    probs = torch.softmax(logits.detach().cpu().double(), dim=-1).numpy()
    cdf = np.cumsum(probs, axis=-1)
    labels = [min(int(np.searchsorted(row, u * row[-1], side="right")), len(row) - 1) for row, u in zip(cdf, uniforms)]
    return torch.tensor(labels, device=logits.device)


def head_gradient(ckpt: Checkpoint, model, final_hidden: torch.Tensor, seed: int) -> torch.Tensor:
    """grad of sum_t log p(y_t) with respect to the last layer's output [n_seq, length, H], y_t drawn from the
    model's distribution at every position (sample_labels, each sequence with its own seed), HEAD_ROWS positions
    at a time."""
    head = "lm_head.weight" if "lm_head.weight" in ckpt.tensors else ckpt.arch.embed_tokens
    norm = getattr(model.model, "norm", None)
    if norm is None:
        raise CheckpointError(f"{ckpt.path}: the model has no final norm (model.norm) to take the gradient through")
    device = final_hidden.device
    weight = torch.from_numpy(np.ascontiguousarray(ckpt.load(head), dtype=np.float32)).to(device)
    grads = torch.empty_like(final_hidden)
    with checkpoint_weights(norm, ckpt, "model.norm.", "the final norm's", device), torch.enable_grad():
        for i, sequence in enumerate(final_hidden):
            for first in range(0, len(sequence), HEAD_ROWS):  # the norm and the head act on each position alone
                h = sequence[first:first + HEAD_ROWS].detach().clone().requires_grad_()
                logits = norm(h) @ weight.T
                labels = sample_labels(logits, seed + i, first)
                log_p = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
                grads[i, first:first + len(h)] = torch.autograd.grad(log_p, h)[0]
    return grads


def layer_gradient(run: Callable[[torch.Tensor], torch.Tensor], norm: torch.nn.Module, hidden_in: torch.Tensor,
                   grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients [n_seq, length, H] with respect to a layer's input and to the residual stream after its
    attention (the input of ``norm``, the norm before its MoE block or FFN), given the gradient with respect to
    its output: ``run`` (forward.layer_runner) forward with gradients, then its backward, SEQUENCES_PER_STEP
    sequences at a time."""
    grad_in, grad_mid = torch.empty_like(hidden_in), torch.empty_like(hidden_in)
    seen = []
    hook = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.enable_grad():
            for first in range(0, len(hidden_in), SEQUENCES_PER_STEP):
                seen.clear()
                h = hidden_in[first:first + SEQUENCES_PER_STEP].detach().clone().requires_grad_()
                y = run(h)
                grad_h, grad_m = torch.autograd.grad(y, (h, seen[0]), grad_outputs=grad_out[first:first + len(h)])
                grad_in[first:first + len(h)] = grad_h
                grad_mid[first:first + len(h)] = grad_m
    finally:
        hook.remove()
    return grad_in, grad_mid


def fisher(ckpt: Checkpoint, model, rotary, inputs: Callable[[int], np.ndarray], seed: int,
           device: torch.device, progress: bool = True) -> Fisher:
    """tr(F) / H at both points of every layer, from ``inputs(il)`` [n_seq, length, H]: the input of layer il for
    the kept sequences, inputs(n_layers) the last layer's output."""
    n_layers = ckpt.n_layers
    hidden = torch.from_numpy(np.array(inputs(n_layers))).to(device)
    n_seq, length, width = hidden.shape
    per_token = 1.0 / (n_seq * length * width)
    mid, out = np.zeros(n_layers), np.zeros(n_layers)
    grad = head_gradient(ckpt, model, hidden, seed)
    glu = ckpt.arch.expert_activation.glu(ckpt.config)
    with tqdm(total=n_layers, desc="Fisher information", unit="layer", disable=not progress, dynamic_ncols=True) as bar:
        for bid in reversed(range(n_layers)):
            out[bid] = float((grad.cpu().double() ** 2).sum()) * per_token
            moe = None
            if ckpt.is_moe(bid):
                router, experts = load_experts(ckpt, bid, device)
                moe = StatisticsMoE(router, experts, glu, RoutingRule.of(ckpt), np.zeros(0, dtype=np.int64),
                                    shared=ckpt.arch.shared_expert, returns_scores=ckpt.arch.hf_moe_returns_scores)
                moe.recompute_experts = True
            with (decoder_layer(model, ckpt, bid, moe, device) as layer,
                  moe.paused() if moe is not None else contextlib.nullcontext()):
                layer.requires_grad_(False)  # the gradients wanted are the hidden states', not the weights'
                run = layer_runner(model, layer, bid, rotary, length, device)
                hidden = torch.from_numpy(np.array(inputs(bid))).to(device)
                grad, grad_mid = layer_gradient(run, getattr(layer, ckpt.arch.moe_input_norm), hidden, grad)
            mid[bid] = float((grad_mid.cpu().double() ** 2).sum()) * per_token
            bar.update(1)
    return Fisher(mid=mid, out=out)
