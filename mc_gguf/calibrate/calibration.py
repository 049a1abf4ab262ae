"""Stream a checkpoint through transformers one decoder layer at a time and collect MoE statistics.

As GPTQ toolkits do, only one decoder layer is in memory: the hidden states of
every calibration sequence are kept in a memory-mapped file between layers,
so peak memory is about one layer plus one batch of activations, whatever
the model size. Each layer runs as transformers' own decoder layer module,
loaded from the safetensors shards; a hook on the norm before the MoE block
sees the block's input, from which the routing, the per-expert input
statistics and the quantization errors (quant_error.py) are computed.

The work is resumable at layer granularity: finished layers and the hidden
states after the last one are kept in ``<STATS>.partial.d`` until the
statistics file is written, and a rerun with the same inputs continues there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mc_gguf import __version__
from mc_gguf.atomic import check_output_path
from mc_gguf.calibrate.quant_error import ExpertWeights, expert_errors, expert_hidden
from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.calibrate.stats import CalibrationStats, LayerStats
from mc_gguf.calibrate.text import CalibrationText, pack_sequences
from mc_gguf.calibrate.workdir import WorkDir
from mc_gguf.errors import CheckpointError
from mc_gguf.ggml.types import quant_type
from mc_gguf.hf.checkpoint import Checkpoint, open_checkpoint

EPS_NORM = ("Frobenius norm (not squared) of the MoE block output change over the sampled "
            "calibration tokens when only this expert is quantized")
# Tokens per forward batch: bounds activation memory independently of --tokens.
FORWARD_TOKENS = 8192


def calibrate(model_dir: str | Path, out: str | Path, text: CalibrationText,
              settings: CalibrationSettings = CalibrationSettings(), *, progress: bool = True) -> CalibrationStats:
    """Measure the statistics of ``model_dir`` on ``text`` and save them to ``out``."""
    out = check_output_path(out)
    ckpt = open_checkpoint(model_dir)
    for name in settings.types:
        quant_type(name)  # unknown names fail here, not after an hour of calibration
    seq_len = min(settings.seq_len, int(ckpt.config.get("max_position_embeddings") or settings.seq_len))
    sequences = _tokenize(ckpt, text, settings.n_tokens, seq_len, settings.seed)
    info = _provenance(ckpt, text, settings, sequences)
    work = WorkDir(Path(str(out) + ".partial.d"), fingerprint={**info, "types": list(settings.types)})

    model = _skeleton(ckpt)
    n_seq, length = sequences.shape
    hidden = int(ckpt.config["hidden_size"])
    n_flat = n_seq * length
    eps_positions = np.sort(np.random.default_rng(settings.seed + 1).choice(
        n_flat, size=min(settings.eps_tokens, n_flat), replace=False))
    start = work.first_unfinished_layer(ckpt.n_layers)
    if start == 0 and not work.hidden_path(0).exists():
        _write_embeddings(ckpt, sequences, work.new_hidden(0, (n_seq, length, hidden)))
    rotary = type(model.model.rotary_emb)(config=model.config)
    for il in range(start, ckpt.n_layers):
        hidden_in = work.open_hidden(il, (n_seq, length, hidden))
        last = il == ckpt.n_layers - 1
        hidden_out = None if last else work.new_hidden(il + 1, (n_seq, length, hidden))
        layer_stats = _calibrate_layer(model, ckpt, il, hidden_in, hidden_out, rotary, eps_positions, settings,
                                       progress=progress)
        work.save_layer(il, layer_stats)
        del hidden_in
        work.hidden_path(il).unlink()

    stats = CalibrationStats(info=info, types=list(settings.types), layers=work.load_layers(ckpt.n_layers))
    stats.save(out)
    work.remove()
    return stats


def _tokenize(ckpt: Checkpoint, text: CalibrationText, n_tokens: int, seq_len: int, seed: int) -> np.ndarray:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
    ids = tokenizer(text.text, add_special_tokens=False).input_ids
    return pack_sequences(ids, tokenizer.bos_token_id, n_tokens, seq_len, seed)


def _provenance(ckpt: Checkpoint, text: CalibrationText, settings: CalibrationSettings, sequences: np.ndarray) -> dict:
    hidden, ff = ckpt.expert_dims
    return {
        "model": str(ckpt.path.resolve()),
        "model_name": ckpt.config.get("_name_or_path") or ckpt.path.resolve().name,
        "architecture": ckpt.arch.hf_architecture,
        "n_layer": ckpt.n_layers,
        "n_expert": ckpt.n_experts,
        "n_expert_used": ckpt.n_experts_used,
        "hidden_size": hidden,
        "expert_ff": ff,
        "text": text.name,
        "text_sha256": text.sha256,
        "n_sequences": int(sequences.shape[0]),
        "seq_len": int(sequences.shape[1]),
        "n_tokens": int(sequences.size),
        "seed": settings.seed,
        "eps_tokens": min(settings.eps_tokens, int(sequences.size)),
        "eps_norm": EPS_NORM,
        "hessian": settings.hessian,
        "mc_gguf_version": __version__,
    }


def _skeleton(ckpt: Checkpoint):
    """The model's module tree on the meta device: no weights are allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ckpt.path))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _write_embeddings(ckpt: Checkpoint, sequences: np.ndarray, hidden: np.memmap) -> None:
    table = ckpt.load(ckpt.arch.embed_tokens)
    for s in range(sequences.shape[0]):
        hidden[s] = table[sequences[s]]
    hidden.flush()


def _load_decoder_layer(model, ckpt: Checkpoint, bid: int):
    """transformers' decoder layer ``bid`` with its weights read from the checkpoint (float32)."""
    layer = model.model.layers[bid]
    layer.to_empty(device="cpu")
    state = {key: torch.from_numpy(_layer_tensor(ckpt, bid, key)) for key in layer.state_dict()}
    layer.load_state_dict(state)
    return layer


def _layer_tensor(ckpt: Checkpoint, bid: int, key: str) -> np.ndarray:
    """The checkpoint tensor behind a decoder layer's state-dict key.

    transformers names the MoE block differently from the checkpoint
    (Mixtral: ``mlp`` in memory, ``block_sparse_moe`` on disk) and, from
    version 5, keeps a layer's experts stacked: gate_up_proj [E, 2F, H] is
    gate and up concatenated per expert, down_proj [E, H, F].
    """
    arch = ckpt.arch
    direct = f"model.layers.{bid}.{key}"
    if direct in ckpt.tensors:
        return ckpt.load(direct)
    moe_prefix = arch.hf_moe_module + "."
    if key.startswith(moe_prefix):
        rest = key[len(moe_prefix):]
        renamed = f"{arch.checkpoint_moe_module(bid)}.{rest}"
        if renamed in ckpt.tensors:
            return ckpt.load(renamed)
        experts = range(ckpt.n_experts)
        if rest == "experts.gate_up_proj":
            return np.stack([np.concatenate([ckpt.load(arch.expert_tensor(bid, x, "gate")),
                                             ckpt.load(arch.expert_tensor(bid, x, "up"))]) for x in experts])
        if rest == "experts.down_proj":
            return np.stack([ckpt.load(arch.expert_tensor(bid, x, "down")) for x in experts])
    raise CheckpointError(f"{ckpt.path}: no checkpoint tensor for layer {bid}'s {key}")


def _calibrate_layer(model, ckpt: Checkpoint, bid: int, hidden_in: np.ndarray, hidden_out: np.ndarray | None,
                     rotary, eps_positions: np.ndarray, settings: CalibrationSettings,
                     *, progress: bool) -> LayerStats:
    from transformers.activations import ACT2FN
    from transformers.masking_utils import create_causal_mask

    arch = ckpt.arch
    act = ACT2FN[ckpt.config.get("hidden_act", "silu")]
    n_seq, length, hidden = hidden_in.shape
    n_expert, k = ckpt.n_experts, ckpt.n_experts_used
    _, ff = ckpt.expert_dims
    router = torch.from_numpy(ckpt.load(arch.router.format(bid=bid) + ".weight"))
    experts = [ExpertWeights(*(torch.from_numpy(ckpt.load(arch.expert_tensor(bid, x, p))) for p in ("gate", "up", "down")))
               for x in range(n_expert)]
    layer = _load_decoder_layer(model, ckpt, bid)

    count = np.zeros(n_expert, dtype=np.int64)
    weight_sum = np.zeros(n_expert, dtype=np.float64)
    imatrix_in = torch.zeros(n_expert, hidden, dtype=torch.float64)
    imatrix_mid = torch.zeros(n_expert, ff, dtype=torch.float64)
    hess_in = torch.zeros(n_expert, hidden, hidden) if settings.hessian else None
    hess_mid = torch.zeros(n_expert, ff, ff) if settings.hessian else None
    ratios, sample_x, sample_ids, sample_w = [], [], [], []

    captured: list[torch.Tensor] = []
    hook = layer.get_submodule(arch.moe_input_norm).register_forward_hook(
        lambda _module, _inputs, output: captured.append(output))
    batch = max(1, FORWARD_TOKENS // length)
    positions = torch.arange(length).unsqueeze(0)
    position_embeddings = None
    bar = tqdm(total=n_seq + n_expert, desc=f"layer {bid + 1}/{ckpt.n_layers}", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for first in range(0, n_seq, batch):
                h = torch.from_numpy(np.array(hidden_in[first:first + batch]))
                if position_embeddings is None:
                    position_embeddings = rotary(h, positions)
                mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None,
                                          past_key_values=None, position_ids=positions)
                captured.clear()
                y = layer(h, position_embeddings=position_embeddings, attention_mask=mask, position_ids=positions)
                if hidden_out is not None:
                    hidden_out[first:first + len(h)] = y.numpy()
                x = captured[0].reshape(-1, hidden).float()

                probs = torch.softmax(x @ router.T, dim=-1)
                top_w, top_ids = torch.topk(probs, k, dim=-1)
                routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_ids, True)
                count += routed.sum(0).numpy()
                weight_sum += (probs * routed).sum(0).double().numpy()
                ratios.append((top_w[:, 1:] / top_w[:, :1]).numpy())
                for e in range(n_expert):
                    xe = x[routed[:, e]]
                    if len(xe) == 0:
                        continue
                    z = expert_hidden(xe, experts[e], act)
                    imatrix_in[e] += (xe.double() ** 2).sum(0)
                    imatrix_mid[e] += (z.double() ** 2).sum(0)
                    if settings.hessian:
                        hess_in[e] += xe.T @ xe
                        hess_mid[e] += z.T @ z

                # the seeded token sample that measures eps, with the weights the block applies
                flat0 = first * length
                chosen = eps_positions[(eps_positions >= flat0) & (eps_positions < flat0 + len(x))] - flat0
                applied = top_w / top_w.sum(-1, keepdim=True) if arch.norm_topk_prob else top_w
                sample_x.append(x[chosen])
                sample_ids.append(top_ids[chosen])
                sample_w.append(applied[chosen])
                bar.update(len(h))
            if hidden_out is not None:
                hidden_out.flush()
    finally:
        hook.remove()
    layer.to("meta")

    layer_stats = LayerStats(
        count=count, weight_sum=weight_sum, top_ratio=np.concatenate(ratios).astype(np.float32),
        imatrix_in=imatrix_in.float().numpy(), imatrix_mid=imatrix_mid.float().numpy(),
        eps=np.zeros((3, n_expert, len(settings.types))),
        hessian_in=hess_in.numpy() if settings.hessian else None,
        hessian_mid=hess_mid.numpy() if settings.hessian else None,
    )
    sx, sids, sw = torch.cat(sample_x), torch.cat(sample_ids), torch.cat(sample_w)
    imat_in, imat_mid = layer_stats.imatrix("in"), layer_stats.imatrix("mid")
    for e in range(n_expert):
        slot = sids == e
        tokens = slot.any(-1)
        bar.set_postfix_str(f"expert {e}: errors of {len(settings.types)} types", refresh=True)
        with torch.no_grad():
            layer_stats.eps[:, e] = expert_errors(experts[e], sx[tokens], sw[slot], act, settings.types,
                                                  imat_in[e], imat_mid[e])
        bar.update(1)
    bar.close()
    return layer_stats
