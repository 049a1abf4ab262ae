"""The streamed forward: the checkpoint's decoder layers, one at a time, in transformers' own modules.

The model's module tree is built on the meta device (no weights); a layer
gets its attention and norm weights from the checkpoint just before it runs
and gives them back after, and its MoE block is mc-gguf's own (moe.py), so
the experts are held once, as the checkpoint's per-expert tensors in their
own dtype, and widened to float32 one expert at a time.
Hidden states of all calibration sequences live in memory-mapped files
between layers (workdir.py), as GPTQ toolkits keep them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from mc_gguf.calibrate.moe import Router
from mc_gguf.calibrate.quant_error import ExpertWeights
from mc_gguf.errors import CheckpointError
from mc_gguf.gguf_io.layout import PROJECTIONS
from mc_gguf.hf.checkpoint import Checkpoint

# Tokens per forward batch: bounds activation memory independently of --tokens.
FORWARD_TOKENS = 8192


def skeleton(ckpt: Checkpoint):
    """The model's module tree on the meta device: no weights are allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ckpt.path))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def embed(ckpt: Checkpoint, sequences: np.ndarray, hidden: np.memmap) -> None:
    """The token embeddings of every sequence, the first layer's input."""
    table = ckpt.load(ckpt.arch.embed_tokens)
    for s in range(sequences.shape[0]):
        hidden[s] = table[sequences[s]]
    hidden.flush()


CPU = torch.device("cpu")


def load_experts(ckpt: Checkpoint, bid: int, device: torch.device = CPU) -> tuple[Router, LayerExperts]:
    """The router (float32, on ``device``) and the experts of layer ``bid``, each read when it is asked for."""
    arch = ckpt.arch
    name = arch.router.format(bid=bid)
    router = Router(*(torch.from_numpy(ckpt.load(f"{name}.{key}")).to(device) if key else None
                      for key in ("weight", arch.selection_bias, arch.router_bias)))
    return router, LayerExperts(ckpt, bid)


class LayerExperts(Sequence[ExpertWeights]):
    """A layer's experts, each read from the checkpoint (in its dtype) when it is asked for and not kept, so
    that one expert is in memory at a time: a Mixtral 8x7B layer's are 2.8 GB in bf16, gpt-oss-120b's 6.4 GB.
    A forward batch of FORWARD_TOKENS reads each expert it routes to once (from the page cache after the
    first batch): a few percent of the batch's time at Mixtral's shapes."""

    def __init__(self, ckpt: Checkpoint, bid: int):
        self.ckpt = ckpt
        self.bid = bid

    def __len__(self) -> int:
        return self.ckpt.n_experts

    def __getitem__(self, xid: int) -> ExpertWeights:
        if not 0 <= xid < len(self):
            raise IndexError(f"layer {self.bid} has {len(self)} experts, not {xid + 1}")
        return load_expert(self.ckpt, self.bid, xid)


def load_expert(ckpt: Checkpoint, bid: int, xid: int) -> ExpertWeights:
    """Expert ``xid`` of layer ``bid``: its gate, up and down in the checkpoint's dtype, and its biases."""
    return ExpertWeights(*(ckpt.expert_weight_torch(bid, xid, p) for p in PROJECTIONS),
                         biases=tuple(ckpt.expert_bias(bid, xid, p) for p in PROJECTIONS) if ckpt.arch.expert_biases
                         else None)


@contextmanager
def decoder_layer(model, ckpt: Checkpoint, bid: int, moe: torch.nn.Module | None,
                  device: torch.device = CPU) -> Iterator[torch.nn.Module]:
    """transformers' decoder layer ``bid`` with its weights read from the checkpoint and ``moe`` as its MoE
    block (holding the original block's shared-expert modules, under their own names, so that their weights
    load from the checkpoint as the rest; None: the layer's own FFN, a dense layer's); the weights are given
    back (and the module tree restored) when the block ends. The layer's weights are put on ``device``."""
    layer = model.model.layers[bid]
    original = getattr(layer, ckpt.arch.hf_moe_module)
    if moe is not None:
        for name in ckpt.arch.shared_modules:
            setattr(moe, name, getattr(original, name))
        setattr(layer, ckpt.arch.hf_moe_module, moe)
    try:
        with checkpoint_weights(layer, ckpt, f"model.layers.{bid}.", f"layer {bid}'s", device):
            yield layer
    finally:
        setattr(layer, ckpt.arch.hf_moe_module, original)


@contextmanager
def checkpoint_weights(module: torch.nn.Module, ckpt: Checkpoint, prefix: str, whose: str,
                       device: torch.device = CPU) -> Iterator[torch.nn.Module]:
    """``module`` of the meta skeleton with its weights read from the checkpoint tensors ``prefix`` + its state-dict
    keys, on ``device``; given back to the meta device when the block ends."""
    try:
        module.to_empty(device=device)
        module.load_state_dict({key: torch.from_numpy(_checkpoint_tensor(ckpt, prefix + key, f"{whose} {key}"))
                                for key in module.state_dict()})
        yield module
    finally:
        module.to("meta")


def _checkpoint_tensor(ckpt: Checkpoint, name: str, what: str) -> np.ndarray:
    if name not in ckpt.tensors:
        raise CheckpointError(f"{ckpt.path}: no checkpoint tensor for {what}")
    return ckpt.load(name)


def run_layer(model, layer, bid: int, rotary, hidden_in: np.ndarray, hidden_out: np.ndarray | None,
              on_batch: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """Run ``layer`` (decoder layer ``bid``) on every sequence of ``hidden_in`` [n_seq, length, hidden], writing
    ``hidden_out``; returns the squared norm of every token's output hidden state [n_seq * length]
    (sequence-major), computed on the device of the layer's weights."""
    n_seq, length, _ = hidden_in.shape
    batch = max(1, FORWARD_TOKENS // length)
    device = next(layer.parameters()).device
    run = layer_runner(model, layer, bid, rotary, length, device)
    norms = []
    with torch.no_grad():
        for first in range(0, n_seq, batch):
            h = torch.from_numpy(np.array(hidden_in[first:first + batch])).to(device)
            y = run(h).cpu()
            if hidden_out is not None:
                hidden_out[first:first + len(h)] = y.numpy()
            norms.append((y.double() ** 2).sum(-1).reshape(-1).numpy())
            on_batch(len(h))
        if hidden_out is not None:
            hidden_out.flush()
    return np.concatenate(norms)


def layer_runner(model, layer, bid: int, rotary, length: int, device: torch.device
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """h [batch, length, hidden] -> ``layer``'s output (decoder layer ``bid``), with the rotary embeddings and the
    mask the model's own forward gives it: causal, or transformers' sliding-window mask for a layer that
    config.json's layer_types calls "sliding_attention" (gpt-oss every other layer)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    layer_types = getattr(model.config, "layer_types", None) or []
    sliding = bid < len(layer_types) and layer_types[bid] == "sliding_attention"
    create_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
    positions = torch.arange(length, device=device).unsqueeze(0)
    rotations = []

    def run(h: torch.Tensor) -> torch.Tensor:
        if not rotations:
            with torch.no_grad():
                rotations.append(rotary(h, positions))
        # config, inputs_embeds, attention_mask, cache (positional: the cache's name changed in 5.x)
        mask = create_mask(model.config, h, None, None, position_ids=positions)
        return layer(h, position_embeddings=rotations[0], attention_mask=mask, position_ids=positions)

    return run
