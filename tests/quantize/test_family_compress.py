"""compress on the other families (Qwen2/3-MoE, OLMoE, DeepSeek-V2, GLM4-MoE, gpt-oss): llama.cpp's converter writes
all but the experts' weights.

On a tiny seeded checkpoint of each family, ``compress`` calibrates,
allocates and quantizes; the file's metadata and non-expert tensors come
from llama.cpp's own convert_hf_to_gguf.py (the family's keys and renames),
its experts from mc-gguf's plan. Checks: the file is what the plan predicts,
byte for byte; the patched runtime runs it as transformers runs the
checkpoint with the file's dequantized experts (per-expert groups, with and
without ODP); ``mc-gguf convert`` writes llama.cpp's own conversion.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from test_quantize import F32_NON_EXPERT, TOLERANCE, dequantized_experts, with_experts

from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.calibrate.text import CalibrationText
from mc_gguf.gguf_io.convert import convert
from mc_gguf.gguf_io.edit import field_value
from mc_gguf.gguf_io.layout import is_expert_weight
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.hf.tiny import build_tiny_family
from mc_gguf.allocate.settings import AllocateSettings
from mc_gguf.pipeline import compress
from mc_gguf.settings import CompressSettings, OdpSettings

from conftest import CALIBRATION_TEXT
from helpers import PROMPT, llama_cpp_logits, transformers_logits

TYPES = ("IQ2_XS", "Q2_K", "Q3_K", "Q4_K")


@pytest.fixture(scope="module", params=["qwen2moe", "qwen3moe", "olmoe", "deepseek2", "glm4moe", "gptoss"])
def family(request, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_family(request.param, tmp_path_factory.mktemp(request.param) / "model")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(folder))(PROMPT).input_ids
    return request.param, folder, model, ids


@pytest.fixture(scope="module")
def compressed(family, tmp_path_factory):
    _, folder, _, _ = family
    out = tmp_path_factory.mktemp("out") / "model.gguf"
    settings = CalibrationSettings(n_tokens=512, seq_len=128, seed=3, types=TYPES)
    # expert FFN 128: the down projections' rows are not whole 256-blocks and fall back (types.stored_type)
    # ggml's quantizer and the authors' cost: what the family's graph computes, not how well it is tuned
    settings = CompressSettings(calibration=settings, tune=None, odp=OdpSettings(skip=0.2),
                                allocation=AllocateSettings(non_expert=F32_NON_EXPERT))
    result = compress(folder, out, 3.5, CalibrationText("test", CALIBRATION_TEXT), settings=settings,
                      progress=False)
    return result


def test_the_file_is_the_plans_with_llama_cpps_metadata(family, compressed):
    _, folder, model, _ = family
    reader = gguf.GGUFReader(compressed.path)
    kind = gguf.MODEL_ARCH_NAMES[open_checkpoint(folder).arch.gguf_arch]
    assert field_value(reader, "general.architecture") == kind
    n_expert = getattr(model.config, "num_experts", None) or model.config.num_local_experts  # GLM: the latter
    assert field_value(reader, f"{kind}.expert_count") == n_expert
    assert field_value(reader, f"{kind}.expert_used_count") == model.config.num_experts_per_tok
    # the plan's tensors, and pruning's mean outputs of every layer it prunes (a per-expert file carries them)
    means = {t.name: t for t in reader.tensors if t.name.endswith(".ffn_odp_mean.weight")}
    hidden, _ = open_checkpoint(folder).expert_dims
    pruned = [il for il, mu in enumerate(compressed.odp.mu) if mu > 0]
    assert pruned and sorted(means) == sorted(f"blk.{il}.ffn_odp_mean.weight" for il in pruned)
    assert all(list(t.shape) == [hidden, n_expert] and t.tensor_type == gguf.GGMLQuantizationType.F32
               for t in means.values())
    assert (sum(int(t.n_bytes) for t in reader.tensors if t.name not in means)
            == compressed.plan.predicted["tensor_bytes"])
    # the prediction counts the model's header, not the mc.* keys of the plan and ODP (a few KB)
    mean_bytes = sum(int(t.n_bytes) for t in means.values())
    assert (compressed.path.stat().st_size - mean_bytes
            == pytest.approx(compressed.plan.predicted["file_bytes"], abs=16384))
    stored = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors if is_expert_weight(t.name)}
    assert len(stored) > 1 and stored <= set(TYPES) | {"IQ4_NL", "Q4_0", "Q5_0"}


@pytest.mark.parametrize("odp", [False, True], ids=["all-experts", "odp"])
def test_llama_cpp_runs_the_written_numbers(family, compressed, odp):
    """With ODP, the thresholds the file carries are in force: transformers with the same thresholds is the
    reference, on the positions whose every decision is clear of the threshold (float32 noise in the
    two engines' hidden states would flip a ratio within 2e-4 of it)."""
    _, folder, model, ids = family
    reference_model = with_experts(model, dequantized_experts(compressed.path))
    got = llama_cpp_logits(compressed.path, ids, **({} if odp else {"mu": 0.0}))
    clear = np.ones(len(ids), dtype=bool)
    if odp:
        from mc_gguf.prune.reference import TransformersOdp

        odp = compressed.odp
        assert max(odp.mu) > 0 and odp.mu_exps is not None and not odp.renormalize  # compress's defaults
        clear = clear_of_thresholds(reference_model, open_checkpoint(folder), ids, odp)
        assert clear.mean() >= 0.4  # up to 7 slots a token, each against its own expert's threshold
        with TransformersOdp(reference_model, odp.mu, odp.protect_ratio, odp.mu_exps, odp.renormalize,
                             file_means(compressed.path, len(odp.mu))):
            reference = transformers_logits(reference_model, ids)
    else:
        reference = transformers_logits(reference_model, ids)
    scale = np.abs(reference).max()
    error = np.abs(got - reference)[clear].max()
    assert error / scale < TOLERANCE
    # and the comparison can fail: quantizing the experts moved the logits far more than that
    assert np.abs(transformers_logits(model, ids) - reference).max() > 5 * error


def file_means(path, n_layers: int) -> list[np.ndarray | None]:
    """The file's pruning mean outputs per layer ([E, H]), None where a layer has none."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    return [np.array(tensors[name].data) if (name := f"blk.{il}.ffn_odp_mean.weight") in tensors else None
            for il in range(n_layers)]


def clear_of_thresholds(model, ckpt, ids, odp, margin=2e-4, logit_margin=5e-3) -> np.ndarray:
    """bool [positions]: no ODP decision of the position, nor (through attention) of an earlier position in an
    earlier layer, has a ratio of a slot's weight to the top weight within ``margin`` of the slot's threshold,
    nor a choice of the last MoE layer's router within ``logit_margin`` of a tie (the last chosen expert's
    logit against the best unchosen one's: skipped slots move the later layers' inputs, and on CPUs without
    AVX2 the engines' noise in them flips so close a choice; earlier layers' ties, which would rule out
    every later position, have not been seen to flip)."""
    weights = []  # (layer, the weights its router gave the chosen slots, their experts, its logits) of every MoE layer
    hooks = [getattr(model.model.layers[il].mlp, ckpt.arch.hf_router).register_forward_hook(
             lambda m, i, o, il=il: weights.append((il, o[1], o[2], o[0]))) for il in ckpt.moe_layers]
    try:
        transformers_logits(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    clear = np.ones(len(ids), dtype=bool)
    last = weights[-1][0]
    for il, w, experts, logits in weights:
        w = w.detach().float().reshape(len(ids), -1).numpy()
        ratio = w / w.max(-1, keepdims=True)
        experts = experts.reshape(len(ids), -1).numpy()
        mu = odp.slot_thresholds(il, experts)
        near = (np.abs(ratio - mu) < margin).any(-1) if odp.mu[il] > 0 else np.zeros_like(clear)
        if il == last:
            logits = logits.detach().float().reshape(len(ids), -1).numpy()
            chosen = np.zeros(logits.shape, dtype=bool)
            np.put_along_axis(chosen, experts, True, axis=-1)
            gap = np.where(chosen, logits, np.inf).min(-1) - np.where(chosen, -np.inf, logits).max(-1)
            clear &= ~(near | (np.abs(gap) < logit_margin))
        elif near.any():
            clear[int(near.argmax()):] = False
    return clear


def test_convert_is_llama_cpps_own_conversion_and_compress_keeps_its_other_tensors(family, compressed, tmp_path):
    """``mc-gguf convert`` runs as transformers runs the checkpoint; the compressed file (non-expert tensors
    planned F32, as this conversion) holds its every other tensor byte for byte, and its every key but the
    file type, besides mc-gguf's own."""
    _, folder, model, ids = family
    out = convert(folder, tmp_path / "f32.gguf", "f32", progress=False)
    reference = transformers_logits(model, ids)
    got = llama_cpp_logits(out, ids)
    assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-2

    converted, ours = gguf.GGUFReader(out), gguf.GGUFReader(compressed.path)
    theirs = {t.name: t for t in converted.tensors if not is_expert_weight(t.name)}
    mine = {t.name: t for t in ours.tensors if not is_expert_weight(t.name)
            and not t.name.endswith(".ffn_odp_mean.weight")}  # pruning's, beside the conversion's
    assert sorted(mine) == sorted(theirs)
    for name, t in theirs.items():
        assert mine[name].tensor_type == t.tensor_type, name
        np.testing.assert_array_equal(np.asarray(mine[name].data), np.asarray(t.data), err_msg=name)
    keys = {k for k in converted.fields if not k.startswith("GGUF.") and k != "general.file_type"}
    assert keys <= set(ours.fields)
    for key in keys:
        assert field_value(ours, key) == field_value(converted, key), key
