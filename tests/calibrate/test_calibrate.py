"""Streaming calibration statistics equal a direct computation on the full transformers model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mc_gguf.calibrate.calibration import calibrate
from mc_gguf.calibrate.stats import EPS_DOWN, EPS_EXPERT, EPS_GATE_UP, StatsFileError, load_stats
from mc_gguf.calibrate.text import CalibrationText, pack_sequences
from mc_gguf.ggml import quants
from mc_gguf.ggml.types import quant_type

from conftest import CALIBRATION_TEXT


@pytest.fixture(scope="module")
def direct(hf_model, hf_tokenizer, calibration_settings):
    """The full model on the same sequences: every layer's MoE input and router probabilities."""
    s = calibration_settings
    ids = hf_tokenizer(CALIBRATION_TEXT, add_special_tokens=False).input_ids
    sequences = pack_sequences(ids, hf_tokenizer.bos_token_id, s.n_tokens, s.seq_len, s.seed)
    moe_inputs = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: moe_inputs.append(o))
             for layer in hf_model.model.layers]
    try:
        with torch.no_grad():
            out = hf_model(torch.from_numpy(sequences), output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    n_layers = len(hf_model.model.layers)
    x = [moe_inputs[il].reshape(-1, moe_inputs[il].shape[-1]) for il in range(n_layers)]
    probs = [torch.softmax(logits.float(), dim=-1) for logits in out.router_logits]
    return x, probs


def test_routing_counts_and_weights_match_transformers_router_logits(calibration, direct, hf_model):
    _, stats = calibration
    _, probs = direct
    k = hf_model.config.num_experts_per_tok
    for il, layer in enumerate(stats.layers):
        top_w, top_ids = torch.topk(probs[il], k, dim=-1)
        count = np.bincount(top_ids.reshape(-1).numpy(), minlength=layer.count.size)
        weight = np.array([probs[il][:, e][(top_ids == e).any(-1)].sum().item() for e in range(layer.count.size)])
        np.testing.assert_array_equal(layer.count, count)
        np.testing.assert_allclose(layer.weight_sum, weight, rtol=1e-4)
        np.testing.assert_allclose(layer.top_ratio[:, 0], (top_w[:, 1] / top_w[:, 0]).numpy(), rtol=1e-4)
        assert layer.phi.sum() == pytest.approx(1.0) and layer.w.sum() == pytest.approx(1.0)


def test_imatrix_and_weighted_hessian_equal_sums_over_each_experts_tokens(calibration, direct, hf_model,
                                                                         tiny_model_dir):
    from mc_gguf.hf.checkpoint import open_checkpoint
    from mc_gguf.quantize.hessian import ExpertHessians

    _, stats = calibration
    hessians = ExpertHessians(open_checkpoint(tiny_model_dir), stats)
    xs, probs = direct
    k = hf_model.config.num_experts_per_tok
    for il, layer in enumerate(stats.layers):
        experts = hf_model.model.layers[il].mlp.experts
        top_w, top_ids = torch.topk(probs[il], k, dim=-1)
        applied = (top_w / top_w.sum(-1, keepdim=True)).double()  # Mixtral renormalises its top-k weights
        # the Hessians' sources: every token's MoE input, its experts and their weights
        np.testing.assert_allclose(stats.moe_input(il), xs[il].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(layer.routed_ids, top_ids.numpy())
        np.testing.assert_allclose(layer.routed_weights, applied.numpy(), rtol=1e-5)
        for e in range(layer.count.size):
            routed = (top_ids == e).any(-1)
            x = xs[il][routed].double()
            gate, up = (x @ experts.gate_up_proj[e].detach().double().T).chunk(2, dim=-1)
            z = torch.nn.functional.silu(gate) * up
            np.testing.assert_allclose(layer.imatrix_in[e], (x ** 2).sum(0).numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(layer.imatrix_mid[e], (z ** 2).sum(0).numpy(), rtol=1e-3, atol=1e-7)
            # the Hessians weight each token by the routing weight it gave the expert, squared
            g = (applied[routed] * (top_ids[routed] == e)).sum(-1, keepdim=True)
            np.testing.assert_allclose(hessians(il, e, "in"), ((x * g).T @ (x * g)).numpy(), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(hessians(il, e, "mid"), ((z * g).T @ (z * g)).numpy(), rtol=1e-3, atol=1e-6)


def _roundtrip_with_gguf_py(weights: torch.Tensor, type_name: str, imatrix: np.ndarray) -> torch.Tensor:
    """Quantize with ggml, dequantize with gguf-py's numpy code (not ggml's to_float, which calibrate uses)."""
    import gguf

    qtype = quant_type(type_name).qtype
    data = quants.quantize(weights.numpy(), qtype, imatrix)
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(weights.shape))


@pytest.mark.parametrize("type_name", ["IQ2_XS", "Q4_K"])
def test_eps_is_the_moe_block_output_error_with_one_expert_quantized(calibration, direct, hf_model, type_name):
    """Recompute eps with transformers' own MoE block, one expert's weights replaced by ggml's quantization."""
    _, stats = calibration
    xs, _ = direct
    t = stats.types.index(type_name)
    il, layer = 1, stats.layers[1]
    block = hf_model.model.layers[il].mlp
    ff = block.experts.down_proj.shape[-1]
    imat_in, imat_mid = layer.imatrix("in"), layer.imatrix("mid")
    with torch.no_grad():
        reference = block(xs[il][None])
        for e in range(layer.count.size):
            saved = block.experts.gate_up_proj[e].clone(), block.experts.down_proj[e].clone()
            gate, up = saved[0][:ff], saved[0][ff:]
            q_gate_up = torch.cat([_roundtrip_with_gguf_py(gate, type_name, imat_in[e]),
                                   _roundtrip_with_gguf_py(up, type_name, imat_in[e])])
            q_down = _roundtrip_with_gguf_py(saved[1], type_name, imat_mid[e])
            for row, (gu, down) in ((EPS_EXPERT, (q_gate_up, q_down)), (EPS_GATE_UP, (q_gate_up, saved[1])),
                                    (EPS_DOWN, (saved[0], q_down))):
                block.experts.gate_up_proj[e] = gu
                block.experts.down_proj[e] = down
                expected = torch.linalg.norm(block(xs[il][None]) - reference).item()
                assert layer.eps[row, e, t] == pytest.approx(expected, rel=2e-3), (row, e)
            block.experts.gate_up_proj[e], block.experts.down_proj[e] = saved
    # fewer bits, more error: a sanity check on the ordering the allocator relies on
    assert (layer.eps[EPS_EXPERT, :, stats.types.index("Q2_K")] > layer.eps[EPS_EXPERT, :, stats.types.index("Q8_0")]).all()


def test_calibrations_moe_block_computes_transformers_moe_output_running_each_expert_once(
        direct, hf_model, tiny_model_dir, monkeypatch):
    """The block that replaces the model's MoE block during calibration gives the model's own output, and
    computes each routed (token, expert) pair exactly once (its activations also feed the statistics)."""
    import mc_gguf.calibrate.moe as moe_module
    from mc_gguf.calibrate.forward import load_experts
    from mc_gguf.hf.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_model_dir)
    xs, _ = direct
    rows = []
    real = moe_module.expert_hidden
    monkeypatch.setattr(moe_module, "expert_hidden", lambda x, w, act: rows.append(len(x)) or real(x, w, act))
    for il in range(ckpt.n_layers):
        router, experts = load_experts(ckpt, il)
        glu = ckpt.arch.expert_activation.glu(ckpt.config)
        moe = moe_module.StatisticsMoE(router, experts, glu, moe_module.RoutingRule.of(ckpt),
                                       np.arange(0))
        rows.clear()
        with torch.no_grad():
            ours = moe(xs[il][None])
            theirs = hf_model.model.layers[il].mlp(xs[il][None])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert sum(rows) == len(xs[il]) * ckpt.n_experts_used == moe.count.sum()


def test_statistics_file_round_trips_with_provenance(calibration, tiny_model_dir):
    path, stats = calibration
    again = load_stats(path)
    assert again.types == stats.types
    assert again.info["text_sha256"] == CalibrationText("x", CALIBRATION_TEXT).sha256
    assert again.info["n_tokens"] == again.info["n_sequences"] * again.info["seq_len"]
    for a, b in zip(again.layers, stats.layers):
        np.testing.assert_array_equal(a.eps, b.eps)
        np.testing.assert_array_equal(a.routed_weights, b.routed_weights)
    assert again.path == path and stats.path == path
    for bid, _ in again.moe_layers:
        assert again.moe_input(bid).shape == (again.info["n_tokens"], again.info["hidden_size"])


def test_interrupted_calibration_resumes_at_the_unfinished_layer(tiny_model_dir, tmp_path, calibration,
                                                                  calibration_settings, monkeypatch):
    import mc_gguf.calibrate.calibration as calibrate_module

    out = tmp_path / "resumed.stats"
    real = calibrate_module.calibrate_layer
    calls = []

    def fail_on_layer_1(model, ckpt, bid, *args, **kwargs):
        calls.append(bid)
        if bid == 1 and len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, ckpt, bid, *args, **kwargs)

    monkeypatch.setattr(calibrate_module, "calibrate_layer", fail_on_layer_1)
    text = CalibrationText("test text", CALIBRATION_TEXT)
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_model_dir, out, text, calibration_settings, progress=False)
    assert not out.exists()
    resumed = calibrate(tiny_model_dir, out, text, calibration_settings, progress=False)
    assert calls == [0, 1, 1]
    assert not (tmp_path / "resumed.stats.partial.d").exists()
    for a, b in zip(resumed.layers, calibration[1].layers):
        np.testing.assert_allclose(a.imatrix_mid, b.imatrix_mid, rtol=1e-6)
        np.testing.assert_array_equal(a.count, b.count)


def test_pack_sequences_starts_each_with_bos_and_is_seeded():
    ids = list(range(10, 1010))
    a = pack_sequences(ids, 1, n_tokens=256, seq_len=64, seed=0)
    assert a.shape == (4, 64) and (a[:, 0] == 1).all()
    assert all(np.array_equal(np.diff(row[1:]), np.ones(62)) for row in a)  # consecutive text
    np.testing.assert_array_equal(a, pack_sequences(ids, 1, n_tokens=256, seq_len=64, seed=0))
    assert not np.array_equal(a, pack_sequences(ids, 1, n_tokens=256, seq_len=64, seed=1))


def test_not_a_statistics_file_is_a_clear_error(tmp_path, converted):
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(StatsFileError, match="not mc-gguf calibration statistics"):
        load_stats(other)
    with pytest.raises(StatsFileError, match="not a readable statistics file"):
        load_stats(converted("q8_0"))
    with pytest.raises(StatsFileError, match="does not exist"):
        load_stats(tmp_path / "missing.stats")


def test_truncated_statistics_file_is_a_clear_error(calibration, tmp_path):
    path, _ = calibration
    cut = tmp_path / "cut.stats"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StatsFileError):
        load_stats(cut)


def test_default_calibration_text_is_offline_english_prose():
    from mc_gguf.calibrate.text import default_text

    text = default_text()
    assert len(text.text) > 300_000 and " the " in text.text


def test_a_bf16_checkpoint_calibrates_exactly_as_its_float32_widening(tmp_path, calibration_settings):
    """Experts stay in the checkpoint's bf16 (half the memory) and are widened one at a time: the statistics are
    those of the same weights stored in float32."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from mc_gguf.hf.tiny import TinyMixtralSpec, build_tiny_mixtral

    bf16 = build_tiny_mixtral(tmp_path / "bf16", TinyMixtralSpec(seed=7, num_hidden_layers=1, dtype="bfloat16"))
    widened = tmp_path / "f32"
    widened.mkdir()
    for item in bf16.iterdir():
        if item.suffix == ".safetensors":
            save_file({k: v.float() for k, v in load_file(str(item)).items()}, str(widened / item.name),
                      metadata={"format": "pt"})
        else:
            (widened / item.name).write_bytes(item.read_bytes())
    settings = replace(calibration_settings, types=("Q4_K", "Q8_0"), hessian=False)
    text = CalibrationText("test text", CALIBRATION_TEXT)
    a = calibrate(bf16, tmp_path / "bf16.stats", text, settings, progress=False)
    b = calibrate(widened, tmp_path / "f32.stats", text, settings, progress=False)
    for name in ("count", "weight_sum", "top_ratio", "imatrix_in", "imatrix_mid", "eps"):
        np.testing.assert_array_equal(getattr(a.layers[0], name), getattr(b.layers[0], name), err_msg=name)


def test_skip_cost_is_the_moe_output_change_with_the_slot_skipped_over_the_layer_output(
        calibration, direct, hf_model, hf_tokenizer, calibration_settings):
    """skip_cost[t, 0] = ||block(x_t) with slot 1 skipped (weights renormalised) - block(x_t)||^2 / ||h_t||^2,
    h_t the decoder layer's output, and drop_cost the same with the kept weight left as it is; the skipped block
    is transformers' own under the ODP reference. slot_experts is transformers' router's second choice. skip_mean
    is each expert's least-squares constant for what its skipped second slots drop, a1 y1 = block - dropped
    block: sum a1 (a1 y1) / sum a1^2 over the tokens whose second choice it is."""
    from mc_gguf.prune.reference import TransformersOdp

    _, stats = calibration
    xs, _ = direct
    s = calibration_settings
    ids = hf_tokenizer(CALIBRATION_TEXT, add_special_tokens=False).input_ids
    sequences = torch.from_numpy(pack_sequences(ids, hf_tokenizer.bos_token_id, s.n_tokens, s.seq_len, s.seed))
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in hf_model.model.layers]
    try:
        with torch.no_grad():
            hf_model(sequences)
    finally:
        for h in hooks:
            h.remove()
    n_layers = len(hf_model.model.layers)
    for il, layer in enumerate(stats.layers):
        block = hf_model.model.layers[il].mlp
        with torch.no_grad():
            reference = block(xs[il][None])[0]
            # mu = 1 and no protection: every token's second slot is skipped (w1 < w0)
            with TransformersOdp(hf_model, [1.0] * n_layers, protect_ratio=0.0):
                skipped = block(xs[il][None])[0]
            with TransformersOdp(hf_model, [1.0] * n_layers, protect_ratio=0.0, renormalize=False):
                dropped = block(xs[il][None])[0]
            _, weights, experts = block.gate(xs[il])
        h = outputs[il].reshape(-1, outputs[il].shape[-1]).double()
        expected = ((skipped - reference).double() ** 2).sum(-1) / (h ** 2).sum(-1)
        np.testing.assert_allclose(layer.skip_cost[:, 0], expected.numpy(), rtol=2e-3, atol=1e-9)
        expected = ((dropped - reference).double() ** 2).sum(-1) / (h ** 2).sum(-1)
        np.testing.assert_allclose(layer.drop_cost[:, 0], expected.numpy(), rtol=2e-3, atol=1e-9)
        assert not np.allclose(layer.drop_cost, layer.skip_cost, rtol=0.1)
        np.testing.assert_array_equal(layer.slot_experts[:, 0], experts[:, 1].numpy())
        a1, share = weights[:, 1].double(), (reference - dropped).double()
        expected = np.zeros_like(layer.skip_mean, dtype=np.float64)
        for e in range(expected.shape[0]):
            mine = experts[:, 1] == e
            if mine.any():
                expected[e] = ((a1[mine, None] * share[mine]).sum(0) / (a1[mine] ** 2).sum()).numpy()
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(layer.skip_mean, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


def test_streamed_statistics_file_reads_back_with_safetensors_own_reader(tmp_path):
    """write_safetensors, which opens a deferred array only to write it, writes what safetensors reads."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from mc_gguf.hf.safetensors_io import write_safetensors

    rng = np.random.default_rng(0)
    arrays = {"b": rng.standard_normal((3, 5)).astype(np.float32), "a": np.arange(7, dtype=np.int32),
              "c": rng.standard_normal(3).astype(np.float64), "empty": np.zeros((0, 4), dtype=np.float32)}
    big = rng.standard_normal((1000, 33)).astype(np.float32)
    np.save(tmp_path / "big.npy", big)
    opened = []
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {**arrays, "big": lambda: opened.append(1) or np.load(tmp_path / "big.npy", mmap_mode="r")},
                      {"k": "v"}, chunk_bytes=1000)
    got = load_file(str(path))
    for name, value in {**arrays, "big": big}.items():
        np.testing.assert_array_equal(got[name], value)
        assert got[name].dtype == value.dtype
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"k": "v"}
    assert len(opened) == 2  # once for its shape, once for its bytes


def _rewritten_stats(src, dst, header_text=None, arrays_change=None):
    """A copy of a statistics file with its header's JSON text replaced or its arrays changed, written as
    calibrate writes it (a consistent safetensors file)."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file

    from mc_gguf.calibrate.stats import METADATA_KEY
    from mc_gguf.hf.safetensors_io import write_safetensors

    with safe_open(str(src), framework="numpy") as f:
        text = f.metadata()[METADATA_KEY]
    arrays = load_file(str(src))
    if arrays_change is not None:
        arrays_change(arrays)
    write_safetensors(dst, arrays, {METADATA_KEY: header_text(json.loads(text)) if header_text else text})
    return dst


def _header(**changes):
    import json

    def edit(header):
        for key, value in changes.items():
            if value is None:
                header.pop(key, None)
            else:
                header[key] = value
        return json.dumps(header)

    return edit


def _array(name, change):
    def edit(arrays):
        arrays[name] = change(arrays[name])

    return edit


@pytest.mark.parametrize("header_text, arrays_change, needle", [
    (lambda h: "null", None, "the statistics' header is NoneType, not a JSON object"),
    (lambda h: "[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
    (_header(types="0000"), None, "the header's types are '0000', not a list of candidate types"),
    (_header(types=["Q4_K", None]), None, "unknown quantization type None"),
    (_header(types=None), None, "the header's types are None"),
    (_header(n_layer=""), None, "the header's n_layer is ''"),
    (_header(n_layer=False), None, "the header's n_layer is False"),
    (_header(model=None), None, "the header's model is None"),
    (_header(n_tokens=-5), None, "the header's n_tokens is -5"),
    (None, _array("blk.1.count", lambda a: a[:3]), "count of layer 1 has shape [3], expected [4]"),
    (None, _array("blk.0.eps", lambda a: a[..., :2]), "eps of layer 0 has shape [3, 4, 2], expected [3, 4, 4]"),
    (None, _array("blk.0.eps", lambda a: np.full_like(a, np.nan)), "eps of layer 0 holds float64 values, not finite"),
    (None, _array("blk.1.slot_experts", lambda a: a + 7), "slot_experts of layer 1 holds values outside [0, 3]"),
    (None, _array("blk.0.weight_sum", lambda a: a.astype(bool)), "weight_sum of layer 0 holds bool values"),
    (None, _array("blk.1.moe_input", lambda a: a[:5]), "layer 1 has its routing but not its MoE inputs [768, 256]"),
])
def test_statistics_whose_header_or_arrays_do_not_fit_are_a_clear_error(calibration, tmp_path, capsys, header_text,
                                                                        arrays_change, needle):
    """What allocate and quantize compute with, checked as the file is read (found by tests/fuzz: each was a
    TypeError, KeyError, IndexError or ValueError, or numpy's broadcasting error in allocate)."""
    import re

    from mc_gguf.cli import main

    path, _ = calibration
    bad = _rewritten_stats(path, tmp_path / "bad.stats", header_text, arrays_change)
    with pytest.raises(StatsFileError, match=re.escape(needle)):
        load_stats(bad)
    assert main(["allocate", str(bad), "--bits", "3", "-o", str(tmp_path / "plan.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mc-gguf: error: ") and err.count("\n") == 1 and needle in err, err
