"""Plans from calibration statistics: budgets, layouts, predicted sizes, files and errors."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from mc_gguf.allocate.allocation import allocate, uniform_plan
from mc_gguf.allocate.cost import significance_cost
from mc_gguf.allocate.plan import PlanFileError, load_plan
from mc_gguf.allocate.program import InfeasibleBudgetError
from mc_gguf.allocate.size import predict
from mc_gguf.calibrate.stats import EPS_DOWN, EPS_EXPERT, EPS_GATE_UP
from mc_gguf.cli import main
from mc_gguf.errors import McGgufError
from mc_gguf.ggml.types import quant_type
from mc_gguf.gguf_io.layout import PROJECTIONS
from mc_gguf.hf.checkpoint import open_checkpoint

from conftest import TEST_TYPES


def expert_bpw_of(plan) -> float:
    return float(plan.expert_bits().mean())  # experts of one model all have the same size


@pytest.mark.parametrize("layout", ["per-expert", "stock"])
@pytest.mark.parametrize("per_projection", [False, True])
def test_plan_meets_the_budget_counted_in_bytes(calibration, tiny_model_dir, layout, per_projection):
    _, stats = calibration
    plan = allocate(stats, 3.0, model_dir=tiny_model_dir, layout=layout, per_projection=per_projection)
    assert plan.predicted["expert_bpw"] <= 3.0 + 1e-9
    assert plan.predicted["expert_bpw"] == pytest.approx(expert_bpw_of(plan))
    for layer in plan.experts:
        for expert in layer:
            assert expert["gate"] == expert["up"]
            if not per_projection:
                assert expert["gate"] == expert["down"]
        if layout == "stock":
            for projection in PROJECTIONS:
                assert len({expert[projection] for expert in layer}) == 1


def test_stock_plan_is_the_brute_force_optimum_over_one_type_per_layer(calibration, tiny_model_dir):
    _, stats = calibration
    plan = allocate(stats, 3.0, model_dir=tiny_model_dir, layout="stock")
    bpw = np.array([quant_type(t).bits_per_weight for t in stats.types])
    layer_cost = [significance_cost(layer.phi, layer.w, layer.eps[EPS_EXPERT]).sum(axis=0) for layer in stats.layers]
    best = min((sum(layer_cost[il][t] for il, t in enumerate(choice)), choice)
               for choice in itertools.product(range(len(bpw)), repeat=len(stats.layers))
               if bpw[list(choice)].mean() <= 3.0)
    chosen = [stats.types.index(layer[0]["gate"]) for layer in plan.experts]
    assert plan.inputs["cost"] == pytest.approx(best[0])
    assert sum(layer_cost[il][t] for il, t in enumerate(chosen)) == pytest.approx(best[0])


def test_per_projection_cost_uses_the_errors_of_each_part(calibration, tiny_model_dir):
    _, stats = calibration
    plan = allocate(stats, 3.5, model_dir=tiny_model_dir, per_projection=True)
    cost = 0.0
    for il, layer in enumerate(stats.layers):
        for xid, expert in enumerate(plan.experts[il]):
            for row, projection in ((EPS_GATE_UP, "gate"), (EPS_DOWN, "down")):
                c = significance_cost(layer.phi, layer.w, layer.eps[row])
                cost += c[xid, stats.types.index(expert[projection])]
    assert plan.inputs["cost"] == pytest.approx(cost)


def test_per_layer_budget_holds_in_every_layer(calibration, tiny_model_dir):
    _, stats = calibration
    plan = allocate(stats, 3.0, model_dir=tiny_model_dir, per_layer=True)
    bits = plan.expert_bits()
    assert (bits.mean(axis=1) <= 3.0 + 1e-9).all()
    assert ((bits < 3.0).any(axis=1) & (bits >= 3.0).any(axis=1)).all()


def test_predicted_file_size_is_exact_for_a_converted_file(tiny_model_dir, converted):
    """A uniform Q8_0 plan describes the file `convert --type q8_0` writes, byte for byte."""
    ckpt = open_checkpoint(tiny_model_dir)
    plan = uniform_plan(ckpt, "Q8_0", {"token_embd": "Q8_0", "output": "Q8_0", "attn": "Q8_0"})
    assert plan.predicted["file_bytes"] == converted("q8_0").stat().st_size
    assert plan.predicted["expert_bpw"] == pytest.approx(8.5)


def test_model_scope_counts_the_non_expert_tensors(calibration, tiny_model_dir):
    _, stats = calibration
    ckpt = open_checkpoint(tiny_model_dir)
    q8 = predict(ckpt, uniform_plan(ckpt, "Q8_0"))
    budget = (q8["model_bpw"] + predict(ckpt, uniform_plan(ckpt, "Q4_K"))["model_bpw"]) / 2
    plan = allocate(stats, budget, model_dir=tiny_model_dir, scope="model")
    assert plan.predicted["model_bpw"] <= budget + 1e-9
    assert 4.5 < plan.predicted["expert_bpw"] < 8.5


@pytest.mark.parametrize("bits, scope", [(1.0, "experts"), (9.0, "experts"), (2.5, "model")])
def test_infeasible_budget_names_the_feasible_range(calibration, tiny_model_dir, bits, scope):
    _, stats = calibration
    with pytest.raises(InfeasibleBudgetError, match=r"feasible budgets are \d+\.\d+ to \d+\.\d+"):
        allocate(stats, bits, model_dir=tiny_model_dir, scope=scope)


def test_types_outside_the_statistics_are_refused(calibration, tiny_model_dir):
    _, stats = calibration
    with pytest.raises(Exception, match="no errors for Q6_K"):
        allocate(stats, 3.0, model_dir=tiny_model_dir, types=["Q6_K", "Q2_K"])


def test_plan_file_round_trip_and_bad_plans(calibration, tiny_model_dir, tmp_path):
    _, stats = calibration
    plan = allocate(stats, 3.0, model_dir=tiny_model_dir, layout="stock")
    path = plan.save(tmp_path / "plan.json")
    again = load_plan(path)
    assert again.experts == plan.experts and again.predicted == plan.predicted
    data = json.loads(path.read_text())
    data["experts"][0][1]["down"] = "Q8_0" if data["experts"][0][0]["down"] != "Q8_0" else "Q2_K"
    (tmp_path / "mixed.json").write_text(json.dumps(data))
    with pytest.raises(PlanFileError, match="one type per layer and projection"):
        load_plan(tmp_path / "mixed.json")
    data["layout"] = "per-expert"
    data["experts"][0][1]["down"] = "Q9_K"
    (tmp_path / "unknown.json").write_text(json.dumps(data))
    with pytest.raises(PlanFileError, match="unknown quantization type"):
        load_plan(tmp_path / "unknown.json")
    (tmp_path / "torn.json").write_text(path.read_text()[:100])
    with pytest.raises(PlanFileError, match="not JSON"):
        load_plan(tmp_path / "torn.json")


@pytest.mark.parametrize("per_projection", [False, True])
def test_max_types_bounds_the_groups_of_every_layer_and_projection(calibration, tiny_model_dir, tmp_path,
                                                                   per_projection):
    path, stats = calibration
    free = allocate(stats, 3.0, model_dir=tiny_model_dir, per_projection=per_projection)
    out = tmp_path / "plan.json"
    args = ["allocate", str(path), "--bits", "3.0", "--max-types", "1", "--model", str(tiny_model_dir), "-o", str(out)]
    assert main(args + (["--per-projection"] if per_projection else [])) == 0
    bounded = load_plan(out)
    assert bounded.budget["max_types"] == 1 and bounded.predicted["expert_bpw"] <= 3.0 + 1e-9
    for layer in bounded.experts:
        for projection in PROJECTIONS:
            assert len({expert[projection] for expert in layer}) == 1
    # one type per tensor is what the stock layout allocates: the same optimum
    stock = allocate(stats, 3.0, model_dir=tiny_model_dir, layout="stock", per_projection=per_projection)
    assert bounded.inputs["cost"] == pytest.approx(stock.inputs["cost"])
    assert bounded.inputs["cost"] >= free.inputs["cost"] - 1e-12


def test_allocate_and_plan_show_commands(calibration, tiny_model_dir, tmp_path, capsys):
    path, _ = calibration
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["allocate", str(path), "--bits", "2.8", "--types", *TEST_TYPES, "--tensor-type", "attn=q6_k",
                 "-o", str(out)]) == 0
    plan = load_plan(out)
    assert plan.non_expert["attn"] == "Q6_K" and plan.predicted["expert_bpw"] <= 2.8
    assert main(["plan-show", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bits per weight" in capsys.readouterr().out
    assert main(["allocate", str(path), "--bits", "0.5", "-o", str(tmp_path / "no.json")]) == 1
    assert "feasible budgets are" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()


DELETE = object()  # _edited: remove the key (or the list item) at the path


def _edited(data: dict, path: tuple, value) -> dict:
    data = json.loads(json.dumps(data))
    *parents, last = path
    target = data
    for step in parents:
        target = target[step]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize("path, value, needle", [
    (("budget",), "3 bits", "budget must be a JSON object"),
    (("budget", "bits"), "three", "budget bits 'three' is not a number of bits per weight"),
    (("budget", "bits"), 1e300, "is not a number of bits per weight (0 to 32)"),
    (("budget", "scope"), ["experts"], "budget scope ['experts'] is not one of experts, model"),
    (("predicted", "expert_bpw"), "2.9", "predicted must be {} or hold expert_bpw"),
    (("predicted", "file_bytes"), DELETE, "predicted must be {} or hold expert_bpw"),
    (("inputs",), None, "inputs must be a JSON object"),
    (("experts", 0, 3), DELETE, "its layers have 3, 4 experts"),
])
def test_a_plan_whose_records_or_layers_do_not_fit_is_refused(calibration, tiny_model_dir, tmp_path, capsys, path,
                                                             value, needle):
    """What plan-show prints and quantize writes into the GGUF, checked as the plan is read (found by tests/fuzz:
    each was a TypeError, AttributeError, OverflowError or ValueError of numpy's)."""
    _, stats = calibration
    good = allocate(stats, 3.0, model_dir=tiny_model_dir).save(tmp_path / "plan.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_edited(json.loads(good.read_text()), path, value)))
    with pytest.raises(PlanFileError, match=re.escape(needle)):
        load_plan(bad)
    assert main(["plan-show", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mc-gguf: error: ") and err.count("\n") == 1 and needle in err, err


def test_a_plan_nested_too_deeply_for_json_is_refused(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PlanFileError, match="nested too deeply"):
        load_plan(path)


@pytest.mark.parametrize("layout", ["per-expert", "stock"])
def test_a_size_budget_gives_the_largest_plan_whose_file_fits(calibration, tiny_model_dir, layout):
    """--size: the file the plan describes, with room for the mc.* keys, is at most the size; the experts take
    what the other tensors leave (within one projection's step of a type); sizes below the smallest file are
    refused with that smallest size."""
    from mc_gguf.allocate.allocation import check_size
    from mc_gguf.allocate.show import describe_plan
    from mc_gguf.allocate.size import metadata_allowance

    _, stats = calibration
    ckpt = open_checkpoint(tiny_model_dir)
    uniform = {t: predict(ckpt, uniform_plan(ckpt, t))["file_bytes"] + metadata_allowance(ckpt) for t in TEST_TYPES}
    size = (min(uniform.values()) + uniform["Q8_0"]) // 2
    plan = allocate(stats, size=size, model_dir=tiny_model_dir, layout=layout)
    predicted = plan.predicted["file_bytes"] + metadata_allowance(ckpt)
    assert predicted <= size
    # no unit of the program (a layer's projection in stock, an expert in per-expert) is left more room than one
    # step up between neighbouring candidate types would need
    hidden, ff = ckpt.expert_dims
    units = ckpt.n_experts if layout == "stock" else 1
    bits = sorted(quant_type(t).bits_per_weight for t in TEST_TYPES)
    step = max(b - a for a, b in zip(bits, bits[1:])) * 3 * hidden * ff * units / 8
    assert size - predicted < step + 4096
    assert plan.budget["scope"] == "model" and plan.budget["size"] == size
    assert f"budget a file of at most {size:,} bytes" in describe_plan(plan)
    assert plan.budget["bits"] == pytest.approx(8 * size / plan.predicted["n_weights"])
    with pytest.raises(InfeasibleBudgetError, match=r"at least ([\d,]+) bytes") as refused:
        check_size(ckpt, 1000, layout, list(TEST_TYPES), {})
    smallest = int(re.search(r"at least ([\d,]+) bytes", str(refused.value)).group(1).replace(",", ""))
    assert smallest <= min(uniform.values())  # every projection at its smallest type: no uniform plan is smaller
    with pytest.raises(InfeasibleBudgetError):
        check_size(ckpt, smallest - 1, layout, list(TEST_TYPES), {})
    check_size(ckpt, smallest, layout, list(TEST_TYPES), {})
    allocate(stats, size=smallest, model_dir=tiny_model_dir, layout=layout)


def test_bits_and_size_are_one_budget(calibration, tiny_model_dir, capsys):
    from mc_gguf.pipeline import compress
    from mc_gguf.settings import CompressSettings

    _, stats = calibration
    with pytest.raises(McGgufError, match="one of the two"):
        allocate(stats, 3.0, size=10**6, model_dir=tiny_model_dir)
    with pytest.raises(McGgufError, match="give --bits with it"):
        allocate(stats, size=10**7, model_dir=tiny_model_dir, per_layer=True)
    with pytest.raises(McGgufError, match="one of the two"):
        compress(tiny_model_dir, tiny_model_dir / "x.gguf", bits=3.0, settings=CompressSettings(size=10**7))
    assert main(["allocate", str(calibration[0]), "--bits", "3", "--size", "1M", "-o", "x.json"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("text, size", [("9.5G", 9_500_000_000), ("8.44M", 8_440_000), ("700K", 700_000),
                                        ("9GiB", 9 * 2**30), ("512Mi", 512 * 2**20), ("123456789", 123456789),
                                        ("2.5gb", 2_500_000_000)])
def test_file_sizes_read_as_the_hub_shows_them(text, size):
    from mc_gguf.cli.common import file_size

    assert file_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1M", "0", "nanG", "9.5X", "1e400"])
def test_a_size_that_is_not_one_is_refused(text):
    import argparse

    from mc_gguf.cli.common import file_size

    with pytest.raises(argparse.ArgumentTypeError):
        file_size(text)
