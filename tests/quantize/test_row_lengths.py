"""Rows that are not whole 256-weight blocks: stored in the type llama-quantize falls back to, never an abort.

Models whose hidden size or expert FFN length is not a multiple of 256 are
common (Qwen1.5-MoE, DeepSeek-V2-Lite and GLM-4.5-Air have expert FFN 1408,
gpt-oss 2880). The reference for the fallback is llama.cpp's own
llama-quantize built from the same sdist.
"""

from __future__ import annotations

import subprocess

import gguf
import numpy as np
import pytest
from test_quantize import F32_NON_EXPERT, TOLERANCE, dequantized_experts, with_experts

from mc_gguf.allocate.allocation import allocate, projection_bits, uniform_plan
from mc_gguf.calibrate.calibration import CalibrationSettings, calibrate
from mc_gguf.calibrate.text import CalibrationText
from mc_gguf.gguf_io.convert import convert
from mc_gguf.gguf_io.layout import PROJECTIONS
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.hf.tiny import TinyMixtralSpec, build_tiny_mixtral
from mc_gguf.quantize.quantization import quantize

from conftest import CALIBRATION_TEXT
from helpers import PROMPT, llama_cpp_logits, transformers_logits

# (hidden, expert FFN): down rows of 352 are whole 32-blocks only; rows of 200 not even that (F16)
SHAPES = {"ffn 352": (256, 352), "hidden 128, ffn 200": (128, 200)}


@pytest.fixture(scope="module", params=list(SHAPES))
def odd_model(request, tmp_path_factory):
    hidden, ff = SHAPES[request.param]
    spec = TinyMixtralSpec(hidden_size=hidden, intermediate_size=ff, num_hidden_layers=1, seed=5)
    return build_tiny_mixtral(tmp_path_factory.mktemp("odd") / "model", spec)


def file_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_stored_types_are_the_ones_llama_quantize_falls_back_to(odd_model, tmp_path):
    from mc_gguf.runtime.stock import stock_tools_dir

    llama_quantize = stock_tools_dir() / "llama-quantize"
    f16 = convert(odd_model, tmp_path / "f16.gguf", "f16", progress=False)
    ckpt = open_checkpoint(odd_model)
    fell_back = set()
    # the types llama-quantize takes without an importance matrix
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q8_0"):
        out = tmp_path / f"{name}.gguf"
        subprocess.run([str(llama_quantize), "--pure", str(f16), str(out), name], check=True, capture_output=True)
        theirs = file_types(out)
        ours = uniform_plan(ckpt, name).experts[0][0]
        for projection in PROJECTIONS:
            assert ours[projection] == theirs[f"blk.0.ffn_{projection}_exps.weight"], (name, projection)
            fell_back.add(ours[projection] != name)
    assert fell_back == {True, False}  # some projections at the asked type, some at its fallback


@pytest.mark.slow
def test_compress_on_odd_rows_writes_the_fallback_types_and_llama_cpp_runs_them(odd_model, tmp_path, prompt_ids_of):
    """calibrate -> allocate -> quantize on such a model: the file holds what the plan predicts, and
    llama.cpp runs exactly those numbers (transformers with the file's dequantized experts as reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    types = ("IQ2_XS", "Q2_K", "Q4_K", "Q6_K")
    settings = CalibrationSettings(n_tokens=512, seq_len=128, seed=3, types=types)
    stats = calibrate(odd_model, tmp_path / "stats", CalibrationText("test", CALIBRATION_TEXT), settings,
                      progress=False)
    ckpt = open_checkpoint(odd_model)
    lo, hi = projection_bits(ckpt, list(types)).min(), projection_bits(ckpt, list(types)).max()
    plan = allocate(stats, (lo + hi) / 2, model_dir=odd_model, non_expert=F32_NON_EXPERT)
    stored = {t for layer in plan.experts for e in layer for t in e.values()}
    assert stored - set(types), "some rows must be stored in a fallback type"
    out = quantize(odd_model, plan, tmp_path / "mixed.gguf", stats=stats, progress=False)
    assert sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors) == plan.predicted["tensor_bytes"]
    assert {t for name, t in file_types(out).items() if "_exps" in name} == stored

    hf_model = AutoModelForCausalLM.from_pretrained(str(odd_model), dtype=torch.float32).eval()
    ids = prompt_ids_of(odd_model)
    reference = transformers_logits(with_experts(hf_model, dequantized_experts(out)), ids)
    got = llama_cpp_logits(out, ids)
    assert np.abs(got - reference).max() / np.abs(reference).max() < TOLERANCE


@pytest.fixture(scope="module")
def prompt_ids_of():
    from transformers import AutoTokenizer

    return lambda model_dir: AutoTokenizer.from_pretrained(str(model_dir))(PROMPT).input_ids


def test_a_plan_whose_type_does_not_fit_the_rows_is_refused_before_writing(odd_model, tmp_path):
    from mc_gguf.allocate.plan import PlanFileError

    ckpt = open_checkpoint(odd_model)
    plan = uniform_plan(ckpt, "Q8_0")
    for expert in plan.experts[0]:
        expert["down"] = "Q4_K"  # rows of 352 or 200 weights: not whole 256-blocks
    out = tmp_path / "out.gguf"
    with pytest.raises(PlanFileError, match="llama-quantize would store it as (Q5_0|F16)"):
        quantize(odd_model, plan, out, progress=False)
    assert list(tmp_path.iterdir()) == []
