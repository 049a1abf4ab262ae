"""The other tensors' statistics (attention, token embeddings, output head) equal a direct computation on the full
transformers model, with ggml's bytes read back by gguf-py; the program chooses their types with the experts'; the
quantizer writes them with their importance (GPTQ and tuning on their Hessians), and llama.cpp computes with them."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from mc_gguf.allocate.allocation import allocate, other_tensors, uniform_plan
from mc_gguf.allocate.cost import COMPRESS_COST
from mc_gguf.allocate.size import metadata_allowance, predict
from mc_gguf.calibrate.quant_error import ggml_roundtrip
from mc_gguf.calibrate.stats import StatsFileError, load_stats
from mc_gguf.calibrate.tensors import ATTENTION_TOKENS
from mc_gguf.calibrate.text import pack_sequences
from mc_gguf.ggml import quants
from mc_gguf.ggml.types import TENSOR_CANDIDATES, quant_type
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.quantize.gptq import damped, gptq_quantize
from mc_gguf.quantize.quantization import quantize
from mc_gguf.quantize.tune import TuneSettings

from conftest import CALIBRATION_TEXT
from helpers import PROMPT, llama_cpp_logits, transformers_logits


def reference_roundtrip(weights: np.ndarray, type_name: str, importance: np.ndarray | None) -> np.ndarray:
    """ggml's bytes, read back by gguf-py's own dequantization."""
    qtype = quant_type(type_name).qtype
    return gguf.quants.dequantize(quants.quantize(weights, qtype, importance), qtype).reshape(weights.shape)


@pytest.fixture(scope="module")
def direct(hf_model, hf_tokenizer, calibration_settings):
    """The full model on the calibration sequences: the tokens, every attention linear's input, the final norm's
    input."""
    s = calibration_settings
    ids = hf_tokenizer(CALIBRATION_TEXT, add_special_tokens=False).input_ids
    sequences = pack_sequences(ids, hf_tokenizer.bos_token_id, s.n_tokens, s.seq_len, s.seed)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [hf_model.model.norm.register_forward_pre_hook(lambda m, a: inputs.__setitem__("final", a[0])),
             hf_model.model.layers[0].register_forward_hook(
                 lambda m, a, out: inputs.__setitem__("layer 0 output", out[0] if isinstance(out, tuple) else out))]
    for il, layer in enumerate(hf_model.model.layers):
        for name in ("q_proj", "o_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_pre_hook(
                lambda m, a, key=f"{il}.{name}": inputs.__setitem__(key, a[0])))
    try:
        with torch.no_grad():
            hf_model(torch.from_numpy(sequences))
    finally:
        for h in hooks:
            h.remove()
    return sequences, inputs


def final_norm_output(hf_model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final RMS norm's output [tokens, H] in float64, computed here from its input."""
    h = inputs["final"].reshape(-1, inputs["final"].shape[-1]).double()
    gain = hf_model.model.norm.weight.detach().double()
    return h / torch.sqrt((h ** 2).mean(-1, keepdim=True) + hf_model.config.rms_norm_eps) * gain


def test_every_attention_matrix_embeddings_and_output_are_measured(calibration, tiny_model_dir):
    _, stats = calibration
    ckpt = open_checkpoint(tiny_model_dir)
    assert stats.tensor_types == list(TENSOR_CANDIDATES)
    assert set(stats.tensors) == set(other_tensors(ckpt, ("attn", "token_embd", "output")))
    for name, tensor in stats.tensors.items():
        assert tensor.error.shape == (len(TENSOR_CANDIDATES),) and (tensor.error > 0).all(), name
        # fewer bits, a larger error: Q2_K's is the largest, Q8_0's the smallest
        assert tensor.error.argmax() == 0 and tensor.error.argmin() == len(TENSOR_CANDIDATES) - 1, name
        assert (tensor.importance is None) == (name == "token_embd.weight")


def test_importance_is_the_mean_square_of_each_input_column(calibration, direct):
    _, stats = calibration
    _, inputs = direct
    for il in range(2):
        for name, hf_name in (("attn_q", "q_proj"), ("attn_k", "q_proj"), ("attn_output", "o_proj")):
            x = inputs[f"{il}.{hf_name}"].reshape(-1, inputs[f"{il}.{hf_name}"].shape[-1]).double()
            np.testing.assert_allclose(stats.tensors[f"blk.{il}.{name}.weight"].importance,
                                       (x ** 2).mean(0).numpy(), rtol=1e-4, atol=1e-7)


def test_attention_output_error_is_the_change_of_the_attentions_output(calibration, direct, hf_model):
    """o_proj's error is linear in its input: the change of the attention's output is dW a on the measured prefix,
    its squares scaled to the eps tokens."""
    _, stats = calibration
    _, inputs = direct
    n_eps = stats.info["eps_tokens"]
    for il in range(2):
        weight = hf_model.model.layers[il].self_attn.o_proj.weight.detach().numpy()
        tensor = stats.tensors[f"blk.{il}.attn_output.weight"]
        a = inputs[f"{il}.o_proj"][0, :ATTENTION_TOKENS].double().numpy()
        for t, type_name in enumerate(stats.tensor_types):
            change = a @ (reference_roundtrip(weight, type_name, tensor.importance) - weight).T.astype(np.float64)
            expected = np.sqrt((change ** 2).sum() * n_eps / len(a))
            assert tensor.error[t] == pytest.approx(expected, rel=2e-3), (il, type_name)


def test_embedding_error_is_the_first_layers_output_change(calibration, direct, hf_model):
    """The first decoder layer's output change on the first sequence's prefix with its tokens' embedding rows at
    each type (gguf-py reads them back), the full transformers model computing it, its squares scaled to the eps
    tokens; and the rerun leaves the first layer's statistics as they were."""
    _, stats = calibration
    sequences, _ = direct
    prefix = torch.from_numpy(sequences[:1, :ATTENTION_TOKENS])
    table = hf_model.model.embed_tokens.weight
    original = table.detach().clone()
    outputs = []
    hook = hf_model.model.layers[0].register_forward_hook(
        lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hf_model(prefix)
            for type_name in stats.tensor_types:
                table.copy_(torch.from_numpy(reference_roundtrip(original.numpy(), type_name, None)))
                hf_model(prefix)
    finally:
        hook.remove()
        with torch.no_grad():
            table.copy_(original)
    reference = outputs[0].double()
    scale = stats.info["eps_tokens"] / prefix.numel()
    for t, type_name in enumerate(stats.tensor_types):
        expected = np.sqrt(float(((outputs[t + 1].double() - reference) ** 2).sum()) * scale)
        assert stats.tensors["token_embd.weight"].error[t] == pytest.approx(expected, rel=2e-3), type_name
    # every calibration token counted once: the rerun gathered nothing
    layer = stats.layers[0]
    assert layer.count.sum() == sequences.size * hf_model.config.num_experts_per_tok
    assert len(layer.top_ratio) == sequences.size


def test_output_error_is_the_logits_change_in_residual_units(calibration, direct, hf_model):
    """|dz|^2 H rms^2 / |W diag(g)|_F^2 summed over the tokens (calibrate/tensors.py), and the importance the mean
    square of the final norm's output."""
    _, stats = calibration
    _, inputs = direct
    h = inputs["final"].reshape(-1, inputs["final"].shape[-1]).double()
    gain = hf_model.model.norm.weight.detach().double()
    normed = final_norm_output(hf_model, inputs)
    tensor = stats.tensors["output.weight"]
    np.testing.assert_allclose(tensor.importance, (normed ** 2).mean(0).numpy(), rtol=1e-4)
    weight = hf_model.lm_head.weight.detach().numpy()
    spread = float(((torch.from_numpy(weight).double() * gain) ** 2).sum()) / h.shape[1]
    for t, type_name in enumerate(stats.tensor_types):
        dz = normed @ torch.from_numpy(reference_roundtrip(weight, type_name, tensor.importance) - weight).double().T
        expected = np.sqrt(float(((dz ** 2).sum(1) * (h ** 2).mean(1)).sum()) / spread)
        assert tensor.error[t] == pytest.approx(expected, rel=2e-3), type_name


def test_hessians_are_the_sums_of_each_inputs_outer_products(calibration, direct, hf_model):
    """q, k and v read the attention's normed input, o its heads' output, the head the final norm's output: each
    stored Hessian is sum x x^T of that input over the calibration tokens (fewer than HESSIAN_TOKENS here)."""
    _, stats = calibration
    _, inputs = direct
    expected = {}
    for il in range(2):
        for hf_name, names in (("q_proj", ("attn_q", "attn_k", "attn_v")), ("o_proj", ("attn_output",))):
            x = inputs[f"{il}.{hf_name}"].reshape(-1, inputs[f"{il}.{hf_name}"].shape[-1]).double()
            for name in names:
                expected[f"blk.{il}.{name}.weight"] = (x.T @ x).numpy()
    normed = final_norm_output(hf_model, inputs)
    expected["output.weight"] = (normed.T @ normed).numpy()
    for name, hessian in expected.items():
        got = stats.tensors[name].hessian()
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, hessian, rtol=1e-4, atol=1e-4 * np.abs(hessian).max(), err_msg=name)
    assert stats.tensors["token_embd.weight"].hessian is None  # a table of rows: no input


def test_a_file_size_budget_chooses_every_other_tensors_type(calibration, tiny_model_dir):
    """With a size, the program prices the other tensors beside the experts: at a size between the smallest and
    the largest, some take fewer bits than Q8_0 and the file fits; a class given a type stays out of it."""
    _, stats = calibration
    ckpt = open_checkpoint(tiny_model_dir)
    q8 = predict(ckpt, uniform_plan(ckpt, "Q8_0"))["file_bytes"] + metadata_allowance(ckpt)
    size = int(q8 * 0.6)
    plan = allocate(stats, size=size, model_dir=tiny_model_dir, **COMPRESS_COST)
    assert plan.predicted["file_bytes"] + metadata_allowance(ckpt) <= size
    assert set(plan.tensors) == set(stats.tensors)
    assert any(quant_type(t).bits_per_weight < quant_type("Q8_0").bits_per_weight for t in plan.tensors.values())
    fixed = allocate(stats, size=size, model_dir=tiny_model_dir, non_expert={"attn": "Q6_K"}, **COMPRESS_COST)
    assert set(fixed.tensors) == {"token_embd.weight", "output.weight"}
    # a budget over the experts alone leaves every other tensor at its class's type
    assert allocate(stats, 4.0, model_dir=tiny_model_dir).tensors == {}


def test_the_other_tensors_are_written_with_their_importance_and_llama_cpp_computes_with_them(
        calibration, tiny_model_dir, tmp_path, hf_model, hf_tokenizer):
    _, stats = calibration
    ckpt = open_checkpoint(tiny_model_dir)
    plan = uniform_plan(ckpt, "Q8_0")
    plan.tensors = {"blk.0.attn_output.weight": "Q3_K", "blk.1.attn_v.weight": "Q4_K", "blk.0.attn_q.weight": "Q2_K",
                    "output.weight": "Q4_K", "token_embd.weight": "Q6_K"}
    out = quantize(tiny_model_dir, plan, tmp_path / "tensors.gguf", stats=stats, gptq=False, progress=False)
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    model = copy.deepcopy(hf_model)
    sources = {"blk.0.attn_output.weight": model.model.layers[0].self_attn.o_proj,
               "blk.1.attn_v.weight": model.model.layers[1].self_attn.v_proj,
               "blk.0.attn_q.weight": model.model.layers[0].self_attn.q_proj,
               "output.weight": model.lm_head, "token_embd.weight": model.model.embed_tokens}
    with torch.no_grad():
        for name, type_name in plan.tensors.items():
            assert written[name].tensor_type.name == type_name
            weight = sources[name].weight
            importance = stats.importance(name, weight.shape[1])
            if name != "blk.0.attn_q.weight":  # q's rows are permuted for llama.cpp's rope; the rows' bytes are not
                expected = quants.quantize(weight.numpy(), quant_type(type_name).qtype, importance)
                np.testing.assert_array_equal(np.asarray(written[name].data).reshape(expected.shape), expected)
            weight.copy_(ggml_roundtrip(weight, type_name, importance))
        for il, layer in enumerate(model.model.layers):  # the experts at Q8_0, as the file holds them
            for e in range(ckpt.n_experts):
                for param in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                    param[e] = ggml_roundtrip(param[e].contiguous(), "Q8_0", None)
    prompt_ids = hf_tokenizer(PROMPT).input_ids
    reference = transformers_logits(model, prompt_ids)
    got = llama_cpp_logits(out, prompt_ids)
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() / scale < 2e-2
    # the low types did change the model: the comparison can fail
    assert np.abs(transformers_logits(hf_model, prompt_ids) - reference).max() / scale > 0.2


def test_a_tensor_error_of_the_wrong_shape_is_refused(calibration, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path, _ = calibration
    with safe_open(str(path), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    arrays["tensor.blk.0.attn_q.weight.error"] = np.ones(3)
    save_file(arrays, str(tmp_path / "bad.stats"), metadata)
    with pytest.raises(StatsFileError, match=r"the error of blk.0.attn_q.weight has shape \[3\]"):
        load_stats(tmp_path / "bad.stats")
    arrays["tensor.blk.0.attn_q.weight.error"] = -np.ones(len(TENSOR_CANDIDATES))
    save_file(arrays, str(tmp_path / "bad.stats"), metadata)
    with pytest.raises(StatsFileError, match="not finite numbers at least 0"):
        load_stats(tmp_path / "bad.stats")
    arrays["tensor.blk.0.attn_q.weight.error"] = np.ones(len(TENSOR_CANDIDATES))
    n = arrays["hessian.blk.0.attn_q.weight"].shape[0]
    for bad in (np.ones((n, n - 1), np.float32), np.ones((n, n), np.float64)):
        arrays["hessian.blk.0.attn_q.weight"] = bad
        save_file(arrays, str(tmp_path / "bad.stats"), metadata)
        with pytest.raises(StatsFileError, match=r"the Hessian of blk.0.attn_q.weight is F\d+ \[\d+, \d+\], expected F32"):
            load_stats(tmp_path / "bad.stats")


def test_a_plan_keeps_its_tensor_types_and_refuses_bad_ones(calibration, tiny_model_dir, tmp_path):
    import json

    from mc_gguf.allocate.plan import PlanFileError, load_plan

    _, stats = calibration
    plan = allocate(stats, size=int(predict(open_checkpoint(tiny_model_dir), uniform_plan(
        open_checkpoint(tiny_model_dir), "Q8_0"))["file_bytes"] * 0.6), model_dir=tiny_model_dir, **COMPRESS_COST)
    path = plan.save(tmp_path / "plan.json")
    assert load_plan(path).tensors == plan.tensors
    data = json.loads(path.read_text())
    for tensors, needle in (({"blk.0.attn_q.weight": "Q9_K"}, "tensor blk.0.attn_q.weight"),
                            ({"blk.0.ffn_down_exps.weight": "Q4_K"}, "experts' types are in experts"),
                            ([1, 2], "tensors must be")):
        path.write_text(json.dumps({**data, "tensors": tensors}))
        with pytest.raises(PlanFileError, match=needle):
            load_plan(path)


def hessian_loss(weights: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> float:
    """sum over rows of e H e^T, e = W - Q, with GPTQ's dampening, in float64."""
    error = weights.astype(np.float64) - quantized.astype(np.float64)
    return float(np.sum((error @ damped(hessian)) * error))


def test_gptq_and_tuning_quantize_the_other_tensors_on_their_hessians(calibration, tiny_model_dir, tmp_path, hf_model):
    """With GPTQ the file holds gptq_quantize's bytes of each tensor on its stored Hessian; tuned, their loss on it
    is below ggml's quantizer's alone (gguf-py reads both back). The tiny model's rows are one super-block, which
    leaves GPTQ no later columns to move errors to: its loss is the quantizer's."""
    _, stats = calibration
    ckpt = open_checkpoint(tiny_model_dir)
    plan = uniform_plan(ckpt, "Q8_0")
    plan.tensors = {"blk.0.attn_output.weight": "Q3_K", "blk.1.attn_v.weight": "Q2_K", "output.weight": "Q4_K"}
    sources = {"blk.0.attn_output.weight": hf_model.model.layers[0].self_attn.o_proj,
               "blk.1.attn_v.weight": hf_model.model.layers[1].self_attn.v_proj, "output.weight": hf_model.lm_head}
    files = {how: quantize(tiny_model_dir, plan, tmp_path / f"{how}.gguf", stats=stats, gptq=how != "plain",
                           tune=TuneSettings(iters=4) if how == "tuned" else None, progress=False)
             for how in ("plain", "gptq", "tuned")}
    written = {how: {t.name: t for t in gguf.GGUFReader(path).tensors} for how, path in files.items()}
    for name, type_name in plan.tensors.items():
        weight = sources[name].weight.detach().numpy()
        qtype = quant_type(type_name).qtype
        hessian = stats.tensors[name].hessian()
        importance = stats.importance(name, weight.shape[1])
        expected = gptq_quantize(weight, hessian, qtype, importance)
        np.testing.assert_array_equal(np.asarray(written["gptq"][name].data).reshape(expected.shape), expected)
        loss = {how: hessian_loss(weight, gguf.quants.dequantize(np.asarray(t[name].data), qtype).reshape(
                weight.shape), hessian) for how, t in written.items()}
        assert loss["tuned"] < loss["gptq"] <= loss["plain"], (name, loss)
