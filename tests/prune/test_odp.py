"""Online Dynamic Pruning in llama.cpp against the transformers reference (mc_gguf.prune.reference.TransformersOdp).

Ties at the threshold: a slot is kept iff w_i / w_0 >= mu in both engines. The
thresholds here are medians of the prompt's own ratios, so one token per layer
sits exactly at mu in the reference; the two engines compute that ratio with
different rounding, so the tests move mu half-way to the next ratio above it,
where float noise (~1e-7) cannot flip a decision.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mc_gguf.calibrate.text import pack_sequences
from mc_gguf.errors import GGUFFileError, InvalidValueError
from mc_gguf.loader.model import load, read_odp_metadata
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.edit import MetadataDetails, float_array, float_value, rewrite_metadata
from mc_gguf.prune.calibration import write_odp_metadata
from mc_gguf.prune.reference import TransformersOdp
from mc_gguf.prune.rule import OdpParams, top_ratios

from helpers import PROMPT, llama_cpp_logits, transformers_logits

# as the F32 conversion test: float32 summation-order noise only
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    return hf_tokenizer(PROMPT).input_ids


def router_ratios(hf_model, ids) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_router_logits=True)
    k = hf_model.config.num_experts_per_tok
    return [top_ratios(torch.softmax(logits.float(), -1).numpy(), k) for logits in out.router_logits]


def safe_median(ratios: np.ndarray) -> float:
    """A threshold near the median that is not within float noise of any ratio."""
    values = np.sort(np.ravel(ratios))
    i = len(values) // 2
    return float((values[i] + values[i + 1]) / 2)


def router_slots(hf_model, ids) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer: w_i / w_0 of every token's slots i >= 1 [tokens, k-1] and their experts, from transformers."""
    import torch

    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_router_logits=True)
    slots = []
    for logits in out.router_logits:
        top, experts = torch.topk(torch.softmax(logits.float(), -1), hf_model.config.num_experts_per_tok, dim=-1)
        slots.append(((top[:, 1:] / top[:, :1]).numpy(), experts[:, 1:].numpy()))
    return slots


def per_expert_mu(hf_model, ids, seed: int = 0) -> list[list[float]]:
    """Per-layer, per-expert thresholds: between two of the middle ratios of the slots each expert had (a seeded
    value for an expert that had fewer than two), none within float noise of any ratio of its slots."""
    n_expert = hf_model.config.num_local_experts
    rng = np.random.default_rng(seed)
    rows = []
    for ratios, experts in router_slots(hf_model, ids):
        row = []
        for xid in range(n_expert):
            mine = np.sort(ratios[experts == xid])
            if len(mine) >= 2:  # the middle of the widest gap between neighbouring ratios around the median
                first = max(0, len(mine) // 4 - 1)
                gaps = np.diff(mine)[first:max(first + 1, 3 * len(mine) // 4)]
                i = first + int(np.argmax(gaps))
                row.append(float((mine[i] + mine[i + 1]) / 2))
            else:
                row.append(float(rng.uniform(0.2, 0.8)))
            assert np.abs(mine - row[-1]).min(initial=1.0) > 1e-4
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def median_mu(hf_model, prompt_ids) -> list[float]:
    return [safe_median(r) for r in router_ratios(hf_model, prompt_ids)]


def reference(hf_model, ids, mu, protect_ratio, mu_exps=None, renormalize=True):
    with TransformersOdp(hf_model, mu, protect_ratio, mu_exps, renormalize) as odp:
        logits = transformers_logits(hf_model, ids)
    return logits, odp.counts


def llama_run(path, ids, **kwargs):
    """Logits at every position and expert slot counts, with an F32 KV cache."""
    from llama_cpp import GGML_TYPE_F32

    settings = dict(n_ctx=512, n_batch=512, logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                    flash_attn=False)
    llm = load(path, **{**settings, **kwargs})
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32), llm.expert_stats()


def test_prefill_skip_counts_and_logits_match_reference(converted, hf_model, prompt_ids, median_mu, tmp_path):
    path = write_odp_metadata(converted("f32"), tmp_path / "odp.gguf", OdpParams(median_mu, 0.02))
    ref_logits, ref_counts = reference(hf_model, prompt_ids, median_mu, 0.02)
    got_logits, got_counts = llama_run(path, prompt_ids)

    assert got_counts.computed == ref_counts.computed
    assert got_counts.skipped == ref_counts.skipped
    assert sum(got_counts.skipped) > 0
    rel_err = np.abs(got_logits - ref_logits).max() / np.abs(ref_logits).max()
    assert rel_err < TOLERANCE
    # pruning changed the output: the comparison is not the unpruned one again
    unpruned = transformers_logits(hf_model, prompt_ids)
    assert np.abs(unpruned - ref_logits).max() / np.abs(ref_logits).max() > 10 * TOLERANCE




def test_kept_weights_left_as_they_are_match_reference(converted, hf_model, prompt_ids, median_mu, tmp_path):
    """mc.odp.renormalize false: a token that drops a slot keeps the other weights as the router gave them, in the
    runtime as in the reference; renormalised (the key absent) the logits are other ones."""
    odp = OdpParams(median_mu, 0.02, renormalize=False)
    path = write_odp_metadata(converted("f32"), tmp_path / "plain.gguf", odp)
    assert read_odp_metadata(path).renormalize is False
    ref_logits, ref_counts = reference(hf_model, prompt_ids, median_mu, 0.02, renormalize=False)
    got_logits, got_counts = llama_run(path, prompt_ids)
    assert got_counts.computed == ref_counts.computed and got_counts.skipped == ref_counts.skipped
    assert sum(got_counts.skipped) > 0
    assert np.abs(got_logits - ref_logits).max() / np.abs(ref_logits).max() < TOLERANCE
    renormalised, _ = reference(hf_model, prompt_ids, median_mu, 0.02)
    assert np.abs(renormalised - ref_logits).max() / np.abs(ref_logits).max() > 10 * TOLERANCE

@pytest.mark.parametrize("protect_ratio", [0.0, 0.1])
def test_per_expert_thresholds_match_reference(converted, hf_model, prompt_ids, tmp_path, protect_ratio):
    """mc.odp.mu_exps: each slot compared with its expert's threshold, in the runtime as in the reference; the
    same file with one threshold per layer (each layer's mean) prunes other slots."""
    mu_exps = per_expert_mu(hf_model, prompt_ids)
    odp = OdpParams.per_expert(mu_exps, protect_ratio)
    path = write_odp_metadata(converted("f32"), tmp_path / "odp.gguf", odp)
    stored = read_odp_metadata(path)
    assert np.allclose(stored.mu_exps, mu_exps, rtol=1e-6) and np.allclose(stored.mu, odp.mu, rtol=1e-6)
    ref_logits, ref_counts = reference(hf_model, prompt_ids, odp.mu, protect_ratio, mu_exps)
    got_logits, got_counts = llama_run(path, prompt_ids)
    assert got_counts.computed == ref_counts.computed and got_counts.skipped == ref_counts.skipped
    assert sum(got_counts.skipped) > 0
    assert np.abs(got_logits - ref_logits).max() / np.abs(ref_logits).max() < TOLERANCE
    layer_mu = [float(np.mean(row)) for row in mu_exps]
    per_layer_logits, _ = reference(hf_model, prompt_ids, layer_mu, protect_ratio)
    assert np.abs(per_layer_logits - ref_logits).max() / np.abs(ref_logits).max() > 10 * TOLERANCE
    # a load-time --mu (mc.odp.mu_all) replaces the per-expert thresholds as it replaces the per-layer ones
    overridden, _ = llama_run(path, prompt_ids, mu=layer_mu[0])
    all_logits, _ = reference(hf_model, prompt_ids, [layer_mu[0]] * len(layer_mu), protect_ratio)
    assert np.abs(overridden - all_logits).max() / np.abs(all_logits).max() < TOLERANCE

def test_decode_uses_the_mu_rule_alone(converted, hf_model, prompt_ids, median_mu, tmp_path):
    """One token per ubatch: no protection; counts equal the reference run token by token."""
    import torch

    path = write_odp_metadata(converted("f32"), tmp_path / "odp.gguf", OdpParams(median_mu, 0.5))
    ids = prompt_ids[:16]
    with TransformersOdp(hf_model, median_mu, 0.5) as odp, torch.no_grad():
        past = None
        for token in ids:
            out = hf_model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    _, got = llama_run(path, ids, n_batch=1, n_ubatch=1)
    assert got.computed == odp.counts.computed and got.skipped == odp.counts.skipped


def test_mu_zero_is_bit_identical_to_no_metadata(converted, prompt_ids, tmp_path):
    plain = llama_cpp_logits(converted("q8_0"), prompt_ids)
    zeros = write_odp_metadata(converted("q8_0"), tmp_path / "zeros.gguf", OdpParams([0.0, 0.0], 0.02))
    logits, counts = llama_run(zeros, prompt_ids)
    assert np.array_equal(logits, plain)
    assert sum(counts.skipped) == 0 and counts.computed == [2 * len(prompt_ids)] * 2


def test_no_odp_override_is_bit_identical_to_no_metadata(converted, prompt_ids, median_mu, tmp_path):
    plain = llama_cpp_logits(converted("q8_0"), prompt_ids)
    path = write_odp_metadata(converted("q8_0"), tmp_path / "odp.gguf", OdpParams(median_mu, 0.02))
    logits, counts = llama_run(path, prompt_ids, odp=False)
    assert np.array_equal(logits, plain) and sum(counts.skipped) == 0


def test_protection_keeps_both_experts_of_the_most_important_tokens(converted, hf_model, prompt_ids, tmp_path):
    """mu = 1 drops every second slot, except for the ceil(rho * L) protected tokens."""
    n = len(prompt_ids)
    for rho, n_protected in ((0.0, 0), (0.02, 1), (3.5 / n, 4)):
        assert math.ceil(rho * n) == n_protected
        path = write_odp_metadata(converted("f32"), tmp_path / f"p{n_protected}.gguf", OdpParams([1.0, 1.0], rho))
        got_logits, got = llama_run(path, prompt_ids)
        assert got.computed == [n + n_protected] * 2
        ref_logits, ref = reference(hf_model, prompt_ids, [1.0, 1.0], rho)
        assert ref.computed == got.computed
        assert np.abs(got_logits - ref_logits).max() / np.abs(ref_logits).max() < TOLERANCE


def test_mu_override_at_load_time(converted, hf_model, prompt_ids):
    """A file without ODP metadata, pruned by the load-time override mc.odp.mu_all."""
    mu = safe_median(np.concatenate(router_ratios(hf_model, prompt_ids)))
    got_logits, got = llama_run(converted("f32"), prompt_ids, mu=mu)
    ref_logits, ref = reference(hf_model, prompt_ids, [mu, mu], 0.02)
    assert got.computed == ref.computed and sum(got.skipped) > 0
    assert np.abs(got_logits - ref_logits).max() / np.abs(ref_logits).max() < TOLERANCE


def test_stock_gguf_runs_unpruned(converted, prompt_ids):
    _, counts = llama_run(converted("f16"), prompt_ids)
    assert counts.skipped == [0, 0] and counts.computed == [2 * len(prompt_ids)] * 2


@pytest.mark.parametrize("updates, message", [
    ({keys.ODP_MU: float_array([0.5])}, "has 1 values but the model has 2 layers"),
    ({keys.ODP_MU: float_array([0.5, float("nan")])}, "is not in [0, 1]"),
    ({keys.ODP_MU: float_array([-0.1, 0.5])}, "is not in [0, 1]"),
    ({keys.ODP_MU: float_array([0.5, 1.5])}, "is not in [0, 1]"),
    ({keys.ODP_MU: float_value(0.5)}, "must be an array of float32"),
    ({keys.ODP_PROTECT_RATIO: float_value(2.0), keys.ODP_MU: float_array([0.5, 0.5])}, "is not in [0, 1]"),
])
def test_malformed_odp_metadata_fails_to_load(converted, tmp_path, updates, message):
    path = rewrite_metadata(converted("f16"), tmp_path / "bad.gguf", updates)
    with pytest.raises(GGUFFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(path)


@pytest.mark.parametrize("updates", [
    {keys.ODP_MU: float_array([0.5])},
    {keys.ODP_MU: MetadataDetails(__import__("gguf").GGUFValueType.ARRAY, [1, 2],
                             sub_type=__import__("gguf").GGUFValueType.INT32)},
    {keys.ODP_MU: float_array([0.5, float("inf")])},
])
def test_runtime_itself_refuses_malformed_odp_metadata(converted, tmp_path, updates):
    """Bypassing the Python checks: llama.cpp's loader fails cleanly, no out-of-bounds read."""
    from llama_cpp import Llama

    path = rewrite_metadata(converted("f16"), tmp_path / "bad.gguf", updates)
    with pytest.raises(ValueError):
        Llama(model_path=str(path), verbose=False)


def test_thresholds_reach_the_target_skip_share():
    rng = np.random.default_rng(0)
    ratios = [rng.uniform(0, 1, 10_000) ** p for p in (0.5, 1.0, 2.0)]
    from mc_gguf.prune.rule import thresholds_for_skip_share

    mu = thresholds_for_skip_share(ratios, 0.2)
    for m, r in zip(mu, ratios):
        assert abs(np.mean(r < m) - 0.4) < 0.001  # 40% of tokens drop slot 1 = 20% of top-2 slots
    with pytest.raises(InvalidValueError, match="not reachable"):
        thresholds_for_skip_share(ratios, 0.6)


def test_odp_calibrate_command_writes_thresholds_for_the_share(converted, tiny_model_dir, hf_model, hf_tokenizer,
                                                            tmp_path, capsys):
    from mc_gguf.cli import main
    from mc_gguf.loader.model import read_odp_metadata

    text_file = tmp_path / "calib.txt"
    text_file.write_text(PROMPT * 4)
    out = tmp_path / "calibrated.gguf"
    # independent: router probabilities of the same two sequences, straight from transformers
    ids = hf_tokenizer(PROMPT * 4, add_special_tokens=False).input_ids
    seqs = [list(s) for s in pack_sequences(ids, hf_tokenizer.bos_token_id, 64, 32, seed=0)]
    assert len(seqs) == 2
    per_layer = [np.concatenate(r) for r in zip(*(router_ratios(hf_model, s) for s in seqs))]
    slot_experts = [np.concatenate([e for _, e in layers]) for layers in zip(*(router_slots(hf_model, s) for s in seqs))]
    for rule in ("quantile", "sensitivity-layer", "sensitivity"):
        code = main(["odp-calibrate", str(tiny_model_dir), str(converted("f16")), "--text", str(text_file),
                     "--skip", "0.25", "--seq-len", "32", "--tokens", "64", "--rule", rule, "-o", str(out)])
        assert code == 0, capsys.readouterr().err
        params = read_odp_metadata(out)
        assert params.protect_ratio == pytest.approx(0.02)
        assert params.renormalize is False  # the default
        assert (params.mu_exps is not None) == (rule == "sensitivity")
        if rule == "quantile":
            np.testing.assert_allclose(params.mu, [np.median(r) for r in per_layer], rtol=1e-6)
        else:  # the layers (and experts) may differ, the calibration tokens' share may not
            mu = [params.slot_thresholds(il, e.reshape(r.shape)) for il, (r, e) in enumerate(zip(per_layer, slot_experts))]
            assert np.mean([np.mean(r < m) for r, m in zip(per_layer, mu)]) / 2 >= 0.25 - 1e-6


def test_a_deep_model_has_graph_room_for_pruning(tmp_path):
    """ODP adds graph nodes no model tensor accounts for; llama.cpp's node budget must include them.

    64 layers is deep enough that the stock budget (8 nodes per model tensor) runs out, which
    aborts the process: the model runs in a child process.
    """
    import subprocess
    import sys

    from mc_gguf.gguf_io.convert import convert
    from mc_gguf.hf.tiny import TinyMixtralSpec, build_tiny_mixtral

    model = build_tiny_mixtral(tmp_path / "deep", TinyMixtralSpec(hidden_size=64, intermediate_size=128,
                                                                   num_hidden_layers=64, max_shard_size="50MB"))
    path = convert(model, tmp_path / "deep.gguf", "f32", progress=False)
    child = ("import sys; from mc_gguf.loader.model import load\n"
             "llm = load(sys.argv[1], mu=1.0, n_ctx=64)\n"
             "llm.eval(list(range(3, 40)))\n"        # prefill: pruning and protection
             "llm.eval([41])\n"                       # decode
             "print(llm.expert_stats().skipped_share)")
    result = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip()) > 0


def test_router_statistics_are_routing_only_and_resume(tiny_model_dir, hf_model, hf_tokenizer, tmp_path):
    """odp-calibrate's pass measures the routing alone (no quantization errors of any tensor), and an interrupted
    run started again finds its finished statistics instead of measuring them again."""
    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.calibrate.text import CalibrationText
    from mc_gguf.errors import McGgufError
    from mc_gguf.prune.calibration import router_statistics

    text = CalibrationText("test", PROMPT * 4)
    stats = router_statistics(tiny_model_dir, text, tmp_path, n_tokens=64, seq_len=32, progress=False)
    assert stats.types == [] and stats.tensor_types == [] and not stats.tensors
    saved = tmp_path / "router.stats"
    written = saved.stat().st_mtime_ns
    again = router_statistics(tiny_model_dir, text, tmp_path, n_tokens=64, seq_len=32, progress=False)
    assert saved.stat().st_mtime_ns == written  # read back, not measured again
    # the routing read back is transformers' own
    ids = hf_tokenizer(PROMPT * 4, add_special_tokens=False).input_ids
    seqs = [list(s) for s in pack_sequences(ids, hf_tokenizer.bos_token_id, 64, 32, seed=0)]
    per_layer = [np.concatenate(r) for r in zip(*(router_ratios(hf_model, s) for s in seqs))]
    for layer, expected in zip(again.layers, per_layer):
        np.testing.assert_allclose(np.sort(layer.top_ratio.ravel()), np.sort(expected.ravel()), rtol=1e-4, atol=1e-6)
    with pytest.raises(McGgufError, match="routing only"):
        allocate(again, bits=3.0)


def with_means(path, out, odp: OdpParams, means: list[np.ndarray]):
    """``path`` with ``odp``'s keys and these mean outputs per layer, whatever its layout (write_odp_metadata
    leaves them out of a file stock llama.cpp loads)."""
    import gguf

    from mc_gguf.gguf_io.edit import rewrite_tensors
    from mc_gguf.gguf_io.layout import odp_mean_name
    from mc_gguf.gguf_io.requirements import ODP_MEAN_LEVEL
    from mc_gguf.gguf_io.write import OutputTensor
    from mc_gguf.prune.rule import odp_metadata

    updates = {**odp_metadata(odp), keys.RUNTIME_PATCH_LEVEL: keys.details(keys.RUNTIME_PATCH_LEVEL, ODP_MEAN_LEVEL)}
    tensors = [OutputTensor(odp_mean_name(il), m.shape, gguf.GGMLQuantizationType.F32, lambda m=m: m)
               for il, m in enumerate(means)]
    return rewrite_tensors(path, out, updates, add=tensors)


def test_mean_outputs_of_skipped_slots_match_reference(converted, hf_model, prompt_ids, median_mu, tmp_path):
    """blk.N.ffn_odp_mean: a skipped slot adds its weight times its expert's row, in the runtime (prefill with
    protection, and decode) as in the reference; without the rows the logits are other ones."""
    config = hf_model.config
    rng = np.random.default_rng(5)
    means = [rng.normal(0, 0.5, (config.num_local_experts, config.hidden_size)).astype(np.float32)
             for _ in range(config.num_hidden_layers)]
    odp = OdpParams(median_mu, 0.02, renormalize=False)
    path = with_means(converted("f32"), tmp_path / "means.gguf", odp, means)
    with TransformersOdp(hf_model, median_mu, 0.02, renormalize=False, means=means) as reference_odp:
        ref_logits = transformers_logits(hf_model, prompt_ids)
    got_logits, got_counts = llama_run(path, prompt_ids)
    assert got_counts.skipped == reference_odp.counts.skipped and sum(got_counts.skipped) > 0
    scale = np.abs(ref_logits).max()
    assert np.abs(got_logits - ref_logits).max() / scale < TOLERANCE
    without, _ = reference(hf_model, prompt_ids, median_mu, 0.02, renormalize=False)
    assert np.abs(without - ref_logits).max() / scale > 10 * TOLERANCE
    # one token at a time (decode: the mu rule alone), the same logits as the reference's without protection
    with TransformersOdp(hf_model, median_mu, 0.0, renormalize=False, means=means):
        ref_decode = np.stack([transformers_logits(hf_model, prompt_ids[:n + 1])[-1] for n in range(8)])
    llm = load(path, n_ctx=512, n_batch=1, n_ubatch=1, logits_all=True, flash_attn=False)
    llm.eval(prompt_ids[:8])
    decoded = np.array(llm.scores[:8], dtype=np.float32)
    assert np.abs(decoded - ref_decode).max() / scale < 10 * TOLERANCE


def test_only_files_stock_llama_cpp_refuses_carry_mean_outputs(converted, hf_model, median_mu, tmp_path):
    """write_odp_metadata keeps a file any llama.cpp loads loadable there (no mean outputs, the patch level of
    pruning alone); a file that has them and is written again with renormalised weights loses them."""
    import gguf

    from mc_gguf.gguf_io.layout import odp_mean_name
    from mc_gguf.gguf_io.requirements import ODP_MEAN_LEVEL, file_requirements
    from mc_gguf.gguf_io.header import scan
    from mc_gguf.gguf_io.write import OutputTensor
    from mc_gguf.prune.means import carries_means

    config = hf_model.config
    mean = np.ones((config.num_local_experts, config.hidden_size), dtype=np.float32)
    tensors = [OutputTensor(odp_mean_name(il), mean.shape, gguf.GGMLQuantizationType.F32, lambda: mean)
               for il in range(config.num_hidden_layers)]
    odp = OdpParams(median_mu, 0.02, renormalize=False)
    plain = write_odp_metadata(converted("f16"), tmp_path / "plain.gguf", odp, tensors)
    header = scan(plain)
    assert not any(t.name.endswith("ffn_odp_mean.weight") for t in header.tensors)
    assert file_requirements(header).stock_loads
    assert not carries_means("llama", [t.name for t in header.tensors])
    assert carries_means("llama", ["blk.0.ffn_down_exps.g1.weight", odp_mean_name(0)])

    carrying = with_means(converted("f16"), tmp_path / "carrying.gguf", odp, [mean] * config.num_hidden_layers)
    assert file_requirements(scan(carrying)).patch_level == ODP_MEAN_LEVEL
    assert not file_requirements(scan(carrying)).stock_loads
    again = write_odp_metadata(carrying, tmp_path / "again.gguf", OdpParams(median_mu, 0.02, renormalize=True))
    header = scan(again)
    assert not any(t.name.endswith("ffn_odp_mean.weight") for t in header.tensors)
    assert file_requirements(header).stock_loads
    # the other tensors are the same bytes
    before = {t.name: np.array(t.data) for t in gguf.GGUFReader(converted("f16")).tensors}
    after = {t.name: np.array(t.data) for t in gguf.GGUFReader(again).tensors}
    assert before.keys() == after.keys() and all(np.array_equal(before[n], after[n]) for n in before)


def test_per_layer_thresholds_over_per_expert_ones_remove_them(converted, median_mu, tmp_path):
    """Writing per-layer thresholds into a file that had per-expert ones leaves no mc.odp.mu_exps behind (the
    runtime would prune by the old ones), with and without mean outputs to rewrite."""
    from mc_gguf.gguf_io.header import scan

    n_expert = 4  # the tiny model (hf/tiny.py)
    per_expert = OdpParams.per_expert([[m] * n_expert for m in median_mu], renormalize=False)
    first = write_odp_metadata(converted("f16"), tmp_path / "first.gguf", per_expert)
    assert keys.ODP_MU_EXPS in scan(first).fields
    again = write_odp_metadata(first, tmp_path / "again.gguf", OdpParams(median_mu, 0.02))
    assert keys.ODP_MU_EXPS not in scan(again).fields
    assert read_odp_metadata(again).mu_exps is None and read_odp_metadata(again).mu == pytest.approx(median_mu)
    carrying = with_means(first, tmp_path / "carrying.gguf", per_expert,
                          [np.zeros((n_expert, 256), dtype=np.float32)] * len(median_mu))
    rewritten = write_odp_metadata(carrying, tmp_path / "rewritten.gguf", OdpParams(median_mu, 0.02))
    assert keys.ODP_MU_EXPS not in scan(rewritten).fields
    assert not any(t.name.endswith("ffn_odp_mean.weight") for t in scan(rewritten).tensors)
