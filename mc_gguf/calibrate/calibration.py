"""calibrate(model_dir, out, text) -> CalibrationStats: the checkpoint on calibration text, one layer at a time.

As GPTQ toolkits do, only one decoder layer is in memory: the hidden states of
every calibration sequence are kept in a memory-mapped file between layers,
so peak memory is about one layer plus one batch of activations, whatever
the model size. A layer is calibrated in named steps (``calibrate_layer``):
transformers' decoder layer runs with mc-gguf's MoE block inside (moe.py),
which reads one expert at a time when it runs (forward.LayerExperts),
computes every expert once per routed token and gathers the statistics on
the way; then the
quantization error of every expert at every candidate type is measured on a
seeded sample of tokens (quant_error.py): here, or with ``ray`` by a task per
expert on a Ray cluster while this process runs the next layer (cluster.py).
The attention's weight matrices are measured here, at the tensor types, with
the first layer the token embeddings, and after the last layer the output
head (tensors.py). Last, with ``fisher_tokens``, the gradient goes back
through the layers for the first sequences, which measures how much a change
at each depth costs (fisher.py).

The work is resumable at layer granularity: finished layers and the hidden
states after the last one are kept in ``<STATS>.partial.d`` (workdir.py)
until the statistics file is written, and a rerun with the same inputs
continues there.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from mc_gguf import __version__
from mc_gguf.atomic import check_output_path, output_lock
from mc_gguf.calibrate.fisher import fisher
from mc_gguf.calibrate.forward import CPU, decoder_layer, embed, load_experts, run_layer, skeleton
from mc_gguf.calibrate.moe import RoutingRule, StatisticsMoE
from mc_gguf.calibrate.quant_error import sample_errors, sampled_features
from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.calibrate.stats import CalibrationStats, LayerStats, TensorStats, load_stats
from mc_gguf.calibrate.tensors import HESSIAN_TOKENS, AttentionProbe, KeptPrefix, embedding_errors, output_errors
from mc_gguf.calibrate.text import CalibrationText, pack_sequences
from mc_gguf.calibrate.workdir import WorkDir
from mc_gguf.device import torch_device
from mc_gguf.errors import McGgufError
from mc_gguf.ggml.types import quant_type
from mc_gguf.hf.checkpoint import Checkpoint, open_checkpoint
from mc_gguf.ray_cluster import check_device, connect

if TYPE_CHECKING:
    from mc_gguf.calibrate.cluster import ClusterErrors

EPS_NORM = ("Frobenius norm (not squared) of the MoE block output change over the sampled "
            "calibration tokens when only this expert is quantized")
SKIP_COST = ("||change of the MoE block output||^2 / ||layer output hidden state||^2 of every token if one of "
             "its slots were skipped, the kept weights renormalised")
DROP_COST = "the same as skip_cost with the kept weights left as they are"


def calibrate(model_dir: str | Path, out: str | Path, text: CalibrationText,
              settings: CalibrationSettings = CalibrationSettings(), *, progress: bool = True,
              reuse: bool = False, ray: str | None = None) -> CalibrationStats:
    """Measure the statistics of ``model_dir`` on ``text`` and save them to ``out``.

    With ``reuse``, statistics already in ``out`` from the very same inputs are returned as they are. ``ray``: a
    Ray cluster's address ("auto": this machine's), whose workers measure the experts' errors (cluster.py; the
    same statistics).
    """
    out = check_output_path(out, inputs=[model_dir])
    with output_lock(out):  # a second run on this output is refused instead of removing this one's work
        return _calibrate(model_dir, out, text, settings, progress=progress, reuse=reuse, ray=ray)


def _calibrate(model_dir: str | Path, out: Path, text: CalibrationText, settings: CalibrationSettings, *,
               progress: bool, reuse: bool, ray: str | None) -> CalibrationStats:
    if ray is not None:
        check_device(settings.device)
    device = torch_device(settings.device)  # a device this machine lacks is refused before any work
    if ray is not None:
        connect(ray)
    ckpt = open_checkpoint(model_dir)
    for name in (*settings.types, *settings.tensor_types):
        quant_type(name)  # unknown names fail here, not after an hour of calibration
    seq_len = min(settings.seq_len, int(ckpt.config.get("max_position_embeddings") or settings.seq_len))
    sequences = _tokenize(ckpt, text, settings.n_tokens, seq_len, settings.seed)
    info = _provenance(ckpt, text, settings, sequences)
    if reuse and out.exists():
        done = _finished(out, info, settings)
        if done is not None:
            return done
    work = WorkDir(Path(str(out) + ".partial.d"), fingerprint={**info, "types": list(settings.types),
                                                               "tensor_types": list(settings.tensor_types)})

    model = skeleton(ckpt)
    n_seq, length = sequences.shape
    shape = (n_seq, length, int(ckpt.config["hidden_size"]))
    n_flat = n_seq * length
    n_kept = _kept_sequences(settings, n_seq, length)
    eps_positions = np.sort(np.random.default_rng(settings.seed + 1).choice(
        n_flat, size=min(settings.eps_tokens, n_flat), replace=False))
    start = work.first_unfinished_layer(ckpt.n_layers)
    if start > 0 and progress:
        print(f"resuming the calibration at layer {start + 1} of {ckpt.n_layers} ({work.path})", flush=True)
    if start == 0 and not work.hidden_path(0).exists():
        hidden = work.new_hidden(0, shape)
        embed(ckpt, sequences, hidden)
        work.finish_hidden(0, hidden)
    rotary = type(model.model.rotary_emb)(config=model.config).to(device)
    errors = None
    if ray is not None and settings.types:
        from mc_gguf.calibrate.cluster import ClusterErrors

        errors = ClusterErrors(ckpt.path, settings)
    # layers whose errors the cluster is measuring
    in_flight: list[tuple[int, LayerStats | None, dict[str, TensorStats]]] = []

    def finish(il: int, layer_stats: LayerStats | None, tensors: dict[str, TensorStats]) -> None:
        if errors is not None and layer_stats is not None:
            with tqdm(total=ckpt.n_experts, desc=f"layer {il + 1}/{ckpt.n_layers}: errors", unit="expert",
                      disable=not progress, dynamic_ncols=True) as bar:
                errors.collect(il, layer_stats, on_expert=lambda: bar.update(1))
        work.save_layer(il, layer_stats, tensors)
        work.drop_hidden(il)  # kept until now: a rerun starts at the first layer not saved

    started = time.monotonic()
    for il in range(start, ckpt.n_layers):
        hidden_in = work.open_hidden(il, shape)
        if n_kept:
            work.keep_sample(il, hidden_in[:n_kept])
        # the last layer's output only for the output head's statistics and the Fisher information
        last = il == ckpt.n_layers - 1
        hidden_out = None if last and not (settings.tensor_types or n_kept) else work.new_hidden(il + 1, shape)
        moe_inputs = work.new_inputs(il, (n_flat, shape[-1])) if settings.hessian and ckpt.is_moe(il) else None
        layer_stats, tensors = calibrate_layer(model, ckpt, il, hidden_in, hidden_out, rotary, eps_positions, settings,
                                      progress=progress, moe_inputs=moe_inputs, device=device, errors=errors,
                                      eta=_eta(time.monotonic() - started, il - start, ckpt.n_layers - il))
        if hidden_out is not None:
            work.finish_hidden(il + 1, hidden_out)  # before the layer counts as done
        if moe_inputs is not None:
            work.finish_inputs(il, moe_inputs)
        del hidden_in
        # on a cluster, a layer's errors are taken after the next layer's forward, which runs meanwhile
        in_flight.append((il, layer_stats, tensors))
        while len(in_flight) > (1 if errors is not None and il < ckpt.n_layers - 1 else 0):
            finish(*in_flight.pop(0))

    layers, tensors = work.load_layers(ckpt.n_layers, dense=info["dense_layers"])
    if settings.tensor_types:
        tensors |= output_errors(ckpt, model, work.open_hidden(ckpt.n_layers, shape), eps_positions,
                                 settings.tensor_types, len(eps_positions), device,
                                 HESSIAN_TOKENS if settings.hessian else 0)
    measured = None
    if n_kept:
        work.keep_sample(ckpt.n_layers, work.open_hidden(ckpt.n_layers, shape)[:n_kept])
        measured = fisher(ckpt, model, rotary, work.open_sample, settings.seed, device, progress)
    stats = CalibrationStats(info=info, types=list(settings.types), layers=layers,
                             tensor_types=list(settings.tensor_types), tensors=tensors, fisher=measured)
    stats.save(out, moe_inputs=work.open_inputs if settings.hessian else None)
    work.remove()
    return stats


def calibrate_layer(model, ckpt: Checkpoint, bid: int, hidden_in: np.ndarray, hidden_out: np.ndarray | None,
                    rotary, eps_positions: np.ndarray, settings: CalibrationSettings,
                    *, progress: bool, eta: str = "", moe_inputs: np.ndarray | None = None,
                    device: torch.device = CPU, errors: ClusterErrors | None = None
                    ) -> tuple[LayerStats | None, dict[str, TensorStats]]:
    """One layer: its forward with the statistics gathered on the way, then every expert's eps (None, and
    only the forward, for a dense layer), computed on ``device``, or put in flight on ``errors``' cluster (its
    ``collect`` fills them in; a calibration without types has none), and its attention's tensors' statistics
    (tensors.py). ``moe_inputs`` [tokens, H] receives the MoE block's inputs."""
    if not ckpt.is_moe(bid):
        bar = tqdm(total=hidden_in.shape[0], desc=f"layer {bid + 1}/{ckpt.n_layers} (dense){eta}", unit="step",
                   disable=not progress, dynamic_ncols=True)
        with decoder_layer(model, ckpt, bid, None, device) as layer:
            _, tensors = _run_measured(model, ckpt, layer, None, bid, rotary, hidden_in, hidden_out, eps_positions,
                                       settings, bar)
        bar.close()
        return None, tensors

    glu = ckpt.arch.expert_activation.glu(ckpt.config)
    router, experts = load_experts(ckpt, bid, device)
    moe = StatisticsMoE(router, experts, glu, RoutingRule.of(ckpt), eps_positions, moe_inputs,
                        shared=ckpt.arch.shared_expert,
                        returns_scores=ckpt.arch.hf_moe_returns_scores)
    local_errors = bool(settings.types) and errors is None
    bar = tqdm(total=hidden_in.shape[0] + len(experts) * local_errors, desc=f"layer {bid + 1}/{ckpt.n_layers}{eta}",
               unit="step", disable=not progress, dynamic_ncols=True)
    with decoder_layer(model, ckpt, bid, moe, device) as layer:
        output_norms, tensors = _run_measured(model, ckpt, layer, moe, bid, rotary, hidden_in, hidden_out,
                                              eps_positions, settings, bar)
    layer_stats = moe.layer_stats(len(settings.types))
    norms = np.maximum(output_norms, np.finfo(np.float32).tiny)[:, None].astype(np.float32)
    layer_stats.skip_cost /= norms
    layer_stats.drop_cost /= norms
    if errors is not None:
        errors.submit(bid, layer_stats, moe.eps_sample())
    elif settings.types:
        _measure_eps(layer_stats, moe, settings, bid, bar)
    bar.close()
    return layer_stats, tensors


def _run_measured(model, ckpt: Checkpoint, layer, moe: StatisticsMoE | None, bid: int, rotary,
                  hidden_in: np.ndarray, hidden_out: np.ndarray | None, eps_positions: np.ndarray,
                  settings: CalibrationSettings, bar: tqdm) -> tuple[np.ndarray, dict[str, TensorStats]]:
    """The layer's forward (run_layer's output norms) with its attention's statistics gathered on the way and
    its tensors' errors measured after it; the first layer's also give the token embeddings' (its input), the
    layer run again on a prefix of it, ``moe`` (its MoE block, None for a dense layer) paused meanwhile."""
    first = KeptPrefix(layer) if bid == 0 and settings.tensor_types else contextlib.nullcontext()
    with AttentionProbe(layer.self_attn, hessian_tokens=HESSIAN_TOKENS if settings.hessian else 0) as probe, first:
        output_norms = run_layer(model, layer, bid, rotary, hidden_in, hidden_out, on_batch=bar.update)
    bar.set_postfix_str(f"attention: errors of {len(settings.tensor_types)} types", refresh=True)
    tensors = probe.errors(ckpt, bid, settings.tensor_types, len(eps_positions))
    if isinstance(first, KeptPrefix):
        tensors |= embedding_errors(ckpt, first, settings.tensor_types, len(eps_positions), moe)
    return output_norms, tensors


def _measure_eps(layer_stats: LayerStats, moe: StatisticsMoE, settings: CalibrationSettings, bid: int,
                 bar: tqdm) -> None:
    """eps[:, e, t]: the block's output error on the sampled tokens with only expert e quantized to type t
    (on a seeded sample of each expert's intermediate features, the same whichever layers ran before)."""
    sample = moe.eps_sample()
    imat_in, imat_mid = layer_stats.imatrix("in"), layer_stats.imatrix("mid")
    for e, stored in enumerate(moe.experts):
        bar.set_postfix_str(f"expert {e}: errors of {len(settings.types)} types", refresh=True)
        layer_stats.eps[:, e] = sample_errors(stored, sample, bid, e, moe.glu, imat_in[e], imat_mid[e], settings)
        bar.update(1)


def _kept_sequences(settings: CalibrationSettings, n_seq: int, length: int) -> int:
    """How many of the first sequences the Fisher information is measured on: enough for settings.fisher_tokens."""
    return min(n_seq, -(-settings.fisher_tokens // length))


def _eta(elapsed: float, done: int, left: int) -> str:
    """", all layers in about 1 h 05 min": the time left at the pace of the layers done in this run."""
    if done == 0:
        return ""
    minutes = round(elapsed / done * left / 60)
    text = f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"
    return f", all layers in about {text}"


def _finished(out: Path, info: dict, settings: CalibrationSettings) -> CalibrationStats | None:
    """The statistics in ``out`` if they were measured from these very inputs, else None."""
    try:
        stats = load_stats(out)
    except McGgufError:
        return None
    return stats if (stats.info == info and stats.types == list(settings.types)
                     and stats.tensor_types == list(settings.tensor_types)) else None


def _tokenize(ckpt: Checkpoint, text: CalibrationText, n_tokens: int, seq_len: int, seed: int) -> np.ndarray:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
    ids = tokenizer(text.text, add_special_tokens=False).input_ids
    return pack_sequences(ids, tokenizer.bos_token_id, n_tokens, seq_len, seed)


def _provenance(ckpt: Checkpoint, text: CalibrationText, settings: CalibrationSettings, sequences: np.ndarray) -> dict:
    hidden, ff = ckpt.expert_dims
    kept = _kept_sequences(settings, *sequences.shape)
    return {
        "model": str(ckpt.path.resolve()),
        "model_name": ckpt.config.get("_name_or_path") or ckpt.path.resolve().name,
        "architecture": ckpt.arch.hf_architecture,
        "n_layer": ckpt.n_layers,
        "dense_layers": ckpt.dense_layers,
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
        "eps_features": sampled_features(ff, settings.eps_features),
        "eps_iquant_share": settings.eps_iquant_share,
        "eps_norm": EPS_NORM,
        "skip_cost": SKIP_COST,
        "drop_cost": DROP_COST,
        "hessian": settings.hessian,
        "mc_gguf_version": __version__,
        **({"fisher_tokens": kept * int(sequences.shape[1])} if kept else {}),  # absent: not measured
    }
