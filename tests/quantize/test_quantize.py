"""Files quantized to a plan: llama.cpp runs exactly the numbers written, in both layouts."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from mc_gguf.allocate.allocation import allocate, uniform_plan
from mc_gguf.allocate.plan import Plan
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.layout import PROJECTIONS
from mc_gguf.gguf_io.regroup import regroup_experts
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.quantize.quantization import quantize

from helpers import PROMPT, llama_cpp_logits, transformers_logits

F32_NON_EXPERT = {"token_embd": "F32", "output": "F32", "attn": "F32"}
# Same weights in both engines; what remains is llama.cpp rounding the activations to 8 bits
# (Q8_K / Q8_0 blocks) for its quantized dot products: about 5e-3 of the logit scale is seen,
# while quantizing the experts moves the logits by 0.2 of it. (The conversion test allows
# 5e-2 for Q8_0, which adds weight rounding.)
TOLERANCE = 2e-2


def mixed_plan(calibration, tiny_model_dir, layout: str) -> Plan:
    _, stats = calibration
    plan = allocate(stats, 3.2, model_dir=tiny_model_dir, layout=layout, per_projection=True,
                     non_expert=F32_NON_EXPERT)
    if layout == "per-expert":
        # make sure some layer and projection really has several groups
        plan.experts[0][0]["down"] = "Q8_0"
        plan.experts[0][1]["down"] = "Q2_K"
        plan.experts[1][2].update(gate="IQ2_XS", up="IQ2_XS")
        plan.experts[1][3].update(gate="Q4_K", up="Q4_K")
    return plan


def dequantized_experts(path) -> dict[tuple[int, str], np.ndarray]:
    """(layer, projection) -> [n_expert, rows, cols] float32 from the file's tensors, groups resolved
    with mc.experts.groups as docs/FORMAT.md describes it."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()
    n_layer = reader.fields[f"{arch}.block_count"].contents()
    n_expert = reader.fields[f"{arch}.expert_count"].contents()
    groups = reader.fields[keys.EXPERT_GROUPS].contents() if keys.EXPERT_GROUPS in reader.fields else None
    n_dense = reader.fields[f"{arch}.leading_dense_block_count"].contents() if (
        f"{arch}.leading_dense_block_count" in reader.fields) else 0
    out = {}
    for bid in range(n_dense, n_layer):
        for p, projection in enumerate(PROJECTIONS):
            stacked = tensors.get(f"blk.{bid}.ffn_{projection}_exps.weight")
            if stacked is not None:
                out[bid, projection] = gguf.quants.dequantize(stacked.data, stacked.tensor_type)
                continue
            group_of = groups[(bid * 3 + p) * n_expert:(bid * 3 + p + 1) * n_expert]
            experts = [None] * n_expert
            for g in sorted(set(group_of)):
                t = tensors[f"blk.{bid}.ffn_{projection}_exps.g{g}.weight"]
                values = gguf.quants.dequantize(t.data, t.tensor_type)
                for local, xid in enumerate(x for x in range(n_expert) if group_of[x] == g):
                    experts[xid] = values[local]
            out[bid, projection] = np.stack(experts)
    return out


def with_experts(hf_model, experts: dict[tuple[int, str], np.ndarray]):
    model = copy.deepcopy(hf_model)
    with torch.no_grad():
        for il, layer in enumerate(model.model.layers):
            if not hasattr(layer.mlp, "experts"):  # a dense layer
                continue
            gate, up, down = (torch.from_numpy(np.ascontiguousarray(experts[il, p])) for p in PROJECTIONS)
            module = layer.mlp.experts
            if hasattr(module, "gate_up_proj_bias"):  # gpt-oss: [E, in, out], gate and up interleaved
                module.gate_up_proj[..., 0::2] = gate.transpose(1, 2)
                module.gate_up_proj[..., 1::2] = up.transpose(1, 2)
                module.down_proj.copy_(down.transpose(1, 2))
                continue
            module.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
            module.down_proj.copy_(down)
    return model


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    return hf_tokenizer(PROMPT).input_ids


@pytest.mark.parametrize("layout", ["per-expert", "stock"])
def test_llama_cpp_runs_the_written_numbers(calibration, tiny_model_dir, tmp_path, hf_model, prompt_ids, layout):
    _, stats = calibration
    plan = mixed_plan(calibration, tiny_model_dir, layout)
    out = quantize(tiny_model_dir, plan, tmp_path / f"{layout}.gguf", stats=stats, gptq=False, progress=False)
    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    if layout == "per-expert":
        assert "blk.0.ffn_down_exps.g1.weight" in names and "blk.1.ffn_gate_exps.g1.weight" in names
    else:
        assert not any(".g0." in n for n in names)

    experts = dequantized_experts(out)
    reference = transformers_logits(with_experts(hf_model, experts), prompt_ids)
    got = llama_cpp_logits(out, prompt_ids)
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() / scale < TOLERANCE
    # and quantization did change the model: the comparison can fail
    original = transformers_logits(hf_model, prompt_ids)
    assert np.abs(original - reference).max() / scale > 10 * TOLERANCE


def test_written_bits_per_weight_equal_the_plans_prediction(calibration, tiny_model_dir, tmp_path):
    _, stats = calibration
    plan = mixed_plan(calibration, tiny_model_dir, "per-expert")
    plan.predicted = {}
    from mc_gguf.allocate.size import predict

    predicted = predict(open_checkpoint(tiny_model_dir), plan)
    out = quantize(tiny_model_dir, plan, tmp_path / "p.gguf", stats=stats, gptq=False, progress=False)
    reader = gguf.GGUFReader(out)
    expert_bytes = sum(int(t.n_bytes) for t in reader.tensors if "_exps" in t.name)
    expert_weights = sum(int(t.n_elements) for t in reader.tensors if "_exps" in t.name)
    assert 8 * expert_bytes / expert_weights == pytest.approx(predicted["expert_bpw"], rel=0.01)
    assert out.stat().st_size == pytest.approx(predicted["file_bytes"], rel=0.01)


def test_stock_layout_loads_in_unmodified_llama_cpp(calibration, tiny_model_dir, tmp_path, prompt_ids):
    """The stock build of the same sdist (no mc-gguf patches) runs a stock-layout file, and gives the
    patched build's logits."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mc_gguf.runtime.stock import stock_library_dir

    _, stats = calibration
    plan = mixed_plan(calibration, tiny_model_dir, "stock")
    out = quantize(tiny_model_dir, plan, tmp_path / "stock.gguf", stats=stats, gptq=False, progress=False)
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(stock_library_dir())}
    helpers = Path(__file__).parent.parent / "helpers.py"
    subprocess.run([sys.executable, str(helpers), str(out), json.dumps(prompt_ids), str(tmp_path / "stock.npy")],
                   env=env, check=True, capture_output=True)
    np.testing.assert_array_equal(np.load(tmp_path / "stock.npy"), llama_cpp_logits(out, prompt_ids))


def test_uniform_plan_without_statistics_needs_no_imatrix_for_k_quants(tiny_model_dir, tmp_path):
    ckpt = open_checkpoint(tiny_model_dir)
    out = quantize(tiny_model_dir, uniform_plan(ckpt, "Q4_K"), tmp_path / "q4.gguf", progress=False)
    assert out.exists()
    with pytest.raises(Exception, match="need an importance matrix"):
        quantize(tiny_model_dir, uniform_plan(ckpt, "IQ2_XS"), tmp_path / "iq2.gguf", progress=False)
    assert not (tmp_path / "iq2.gguf").exists()


# gate/up and down grouped alike (down runs on each group's own activation), and differently
# (the activations are summed over the groups first)
REGROUPINGS = {
    "down grouped alike": ({0: [1, 3], 1: [0], 2: [2]}, None),
    "down grouped apart": ({0: [1, 3], 1: [0], 2: [2]}, {0: [0, 1], 1: [2, 3]}),
}


@pytest.fixture(scope="module")
def stock_q4(calibration, tiny_model_dir, tmp_path_factory):
    _, stats = calibration
    ckpt = open_checkpoint(tiny_model_dir)
    return quantize(tiny_model_dir, uniform_plan(ckpt, "Q4_K"), tmp_path_factory.mktemp("q4") / "stock.gguf",
                          stats=stats, progress=False)


@pytest.mark.parametrize("regrouping", REGROUPINGS)
def test_experts_split_into_groups_give_the_stock_files_logits_exactly(stock_q4, tiny_model_dir, tmp_path,
                                                                       prompt_ids, regrouping):
    """The runtime's group mechanics alone: same bytes, regrouped, must compute the same numbers."""
    grouped = regroup_experts(stock_q4, tmp_path / "grouped.gguf", *REGROUPINGS[regrouping])
    expected = llama_cpp_logits(stock_q4, prompt_ids)
    np.testing.assert_array_equal(llama_cpp_logits(grouped, prompt_ids), expected)
    # single tokens (decode) as well as a prompt batch
    np.testing.assert_array_equal(llama_cpp_logits(grouped, prompt_ids, n_batch=1)[-1],
                                  llama_cpp_logits(stock_q4, prompt_ids, n_batch=1)[-1])


@pytest.mark.parametrize("regrouping", REGROUPINGS)
def test_pruned_slots_are_skipped_alike_in_groups(stock_q4, tiny_model_dir, tmp_path, prompt_ids, regrouping):
    """ODP on a per-expert file: the same slots skipped, the same numbers as on the stock file."""
    from llama_cpp import GGML_TYPE_F32

    from mc_gguf.loader.model import load

    grouped = regroup_experts(stock_q4, tmp_path / "grouped.gguf", *REGROUPINGS[regrouping])
    settings = dict(n_ctx=512, logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False,
                    mu=0.97, protect_ratio=0.1)
    for n_batch in (512, 1):
        runs = []
        for path in (stock_q4, grouped):
            llm = load(path, n_batch=n_batch, **settings)
            llm.eval(prompt_ids)
            runs.append((np.array(llm.scores[: len(prompt_ids)], dtype=np.float32), llm.expert_stats()))
        (expected, expected_counts), (got, got_counts) = runs
        # some slots skipped, some second slots kept
        assert 0 < sum(expected_counts.skipped) < len(prompt_ids) * len(expected_counts.skipped)
        assert got_counts == expected_counts
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("regrouping", REGROUPINGS)
def test_group_by_group_graph_gives_the_same_logits(stock_q4, tiny_model_dir, tmp_path, prompt_ids, regrouping):
    """The graph backends without MUL_MAT_ID_GROUPS run (one MUL_MAT_ID per group, their outputs
    summed), forced on the CPU: the stock file's numbers, with and without pruned slots."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    grouped = regroup_experts(stock_q4, tmp_path / "grouped.gguf", *REGROUPINGS[regrouping])
    env = {**os.environ, "LLAMA_MC_EXPERT_GROUPS_SPLIT": "1"}
    helpers = Path(__file__).parent.parent / "helpers.py"
    for kwargs in ({"n_batch": 512}, {"n_batch": 1}, {"n_batch": 512, "mu": 0.97, "protect_ratio": 0.1},
                   {"n_batch": 1, "mu": 0.97, "protect_ratio": 0.1}):
        out = tmp_path / "split.npy"
        subprocess.run([sys.executable, str(helpers), str(grouped), json.dumps(prompt_ids), str(out),
                        json.dumps(kwargs)], env=env, check=True, capture_output=True)
        np.testing.assert_array_equal(np.load(out), llama_cpp_logits(stock_q4, prompt_ids, **kwargs),
                                      err_msg=str(kwargs))


def test_corrupted_group_map_fails_to_load_cleanly(stock_q4, tiny_model_dir, tmp_path):
    from llama_cpp import Llama

    from mc_gguf.errors import GGUFFileError
    from mc_gguf.loader.model import load
    from mc_gguf.gguf_io.edit import MetadataDetails, rewrite_metadata

    grouped = regroup_experts(stock_q4, tmp_path / "grouped.gguf", {0: [0, 1], 1: [2, 3]})
    good = gguf.GGUFReader(grouped).fields[keys.EXPERT_GROUPS].contents()
    corruptions = {
        "moved": (good[:1] + [1] + good[2:], "holds 2 experts, the map puts"),      # counts no longer match
        "empty group": (good[:2] + [2, 2] + good[4:], "group 1 has no experts"),
        "short": (good[:-1], "expected n_layer"),
        "gate and up apart": (good[:4] + [1, 1, 0, 0] + good[8:], "groups gate and up differently"),
    }
    for name, (values, message) in corruptions.items():
        bad = tmp_path / f"bad-{name.replace(' ', '-')}.gguf"
        rewrite_metadata(grouped, bad, {keys.EXPERT_GROUPS: MetadataDetails(gguf.GGUFValueType.ARRAY, values,
                                                                         sub_type=gguf.GGUFValueType.INT32)})
        with pytest.raises(GGUFFileError, match=message):
            load(bad, verbose=False)
        with pytest.raises(ValueError):  # the runtime refuses it too, without crashing
            Llama(model_path=str(bad), verbose=False)


def test_interrupted_write_leaves_no_output(calibration, tiny_model_dir, tmp_path, monkeypatch):
    import mc_gguf.quantize.quantization as quantize_module

    _, stats = calibration
    plan = mixed_plan(calibration, tiny_model_dir, "per-expert")
    real = quantize_module.ExpertQuantizer.__call__
    calls = []

    def interrupt_on_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize_module.ExpertQuantizer, "__call__", interrupt_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model_dir, plan, tmp_path / "out.gguf", stats=stats, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_where_a_file_runs_is_in_the_file_and_said(calibration, tiny_model_dir, tmp_path):
    """A per-expert file needs the patched runtime (the stock build of the same sdist refuses it, for want of the
    stacked expert tensor), a stock-layout file does not; the file says so (mc.runtime.patch_level), inspect
    prints it, and a runtime older than the file's level is refused with it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails

    from mc_gguf.errors import RuntimeMissingError
    from mc_gguf.loader.model import load
    from mc_gguf.gguf_io.edit import rewrite_metadata
    from mc_gguf.gguf_io.header import scan
    from mc_gguf.runtime.stock import stock_library_dir

    _, stats = calibration
    helpers = Path(__file__).parent.parent / "helpers.py"
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(stock_library_dir())}
    for layout, level, stock_loads, said in (("per-expert", 4, False, "mc-gguf's runtime only"),
                                              ("stock", 0, True, "any llama.cpp loads it")):
        out = quantize(tiny_model_dir, mixed_plan(calibration, tiny_model_dir, layout), tmp_path / f"{layout}.gguf",
                       stats=stats, gptq=False, progress=False)
        assert scan(out).fields["mc.runtime.patch_level"] == level
        stock = subprocess.run([sys.executable, str(helpers), str(out), json.dumps([1, 2, 3]),
                                str(tmp_path / "logits.npy")], env=env, capture_output=True, text=True)
        assert (stock.returncode == 0) == stock_loads, stock.stderr[-2000:]
        shown = subprocess.run([sys.executable, "-m", "mc_gguf", "inspect", str(out)], capture_output=True, text=True)
        assert said in shown.stdout, shown.stdout
    future = rewrite_metadata(tmp_path / "per-expert.gguf", tmp_path / "future.gguf",
                              {"mc.runtime.patch_level": MetadataDetails(gguf.GGUFValueType.UINT32, 99)})
    with pytest.raises(RuntimeMissingError, match=r"future.gguf \(mc.runtime.patch_level\) needs 99"):
        load(future)


def test_pruning_keys_raise_the_patch_level_as_the_patches_that_read_them():
    from mc_gguf.gguf_io.requirements import requirements

    stacked = ["blk.0.ffn_down_exps.weight"]
    grouped = ["blk.0.ffn_down_exps.g0.weight", "blk.0.ffn_down_exps.g1.weight"]
    assert requirements("llama", stacked, {}).patch_level == 0
    assert requirements("llama", grouped, {}).patch_level == 4
    assert requirements("qwen3moe", grouped, {}).patch_level == 6
    assert requirements("llama", stacked, {keys.ODP_MU: [0.1]}).patch_level == 4
    assert requirements("llama", stacked, {keys.ODP_MU: [0.1], keys.ODP_RENORMALIZE: False}).patch_level == 12
    assert requirements("gpt-oss", stacked, {keys.ODP_MU: [0.1]}).stock_loads
    assert not requirements("gpt-oss", grouped, {}).stock_loads
