"""One command from checkpoint to a running mixed-precision GGUF, and inspect on what it wrote."""

from __future__ import annotations

import json

import gguf
import pytest

from mc_gguf.cli import main
from mc_gguf.loader.model import load
from mc_gguf.quantize.settings import TuneSettings

from conftest import CALIBRATION_TEXT, TEST_TYPES


@pytest.mark.parametrize("layout, tune", [("per-expert", []), ("stock", ["--no-tune"])])
def test_compress_writes_a_file_that_runs_and_inspect_reads_it(tiny_model_dir, tmp_path, capsys, layout, tune):
    """compress's defaults (tuning, a type per projection) in the per-expert layout, ggml's quantizer alone
    (--no-tune) in stock."""
    text = tmp_path / "calib.txt"
    text.write_text(CALIBRATION_TEXT, encoding="utf-8")
    out = tmp_path / "out.gguf"
    keep = tmp_path / "artifacts"
    assert main(["compress", str(tiny_model_dir), "--bits", "3", "--calib", str(text), "--layout", layout,
                 "--odp-skip", "0.25", "--types", *TEST_TYPES, "--tokens", "1024", "--seq-len", "128", *tune,
                 "--keep-artifacts", str(keep), "-q", "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "expected share of expert slots skipped" in summary
    assert (keep / "plan.json").exists() and (keep / "stats.safetensors").exists()

    assert main(["inspect", str(out), "--json", "--plot", str(tmp_path / "experts.png")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["expert_bpw"] <= 3.0 and info["mc"]["mc.plan.layout"] == layout
    assert info["mc"]["mc.quantize.tune_iters"] == (0 if tune else TuneSettings().iters)
    assert info["mc"]["mc.quantize.gptq"] == (not tune)
    assert len(info["mc"]["mc.odp.mu"]) == 2
    plan = json.loads((keep / "plan.json").read_text())
    assert info["experts"] == plan["experts"]  # what the file holds is what was planned
    assert plan["budget"]["per_projection"] == (not tune)  # on by default when tuning

    llm = load(out, n_ctx=256, verbose=False)
    text_out = llm.create_completion("The router chooses", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert isinstance(text_out, str)
    assert llm.expert_stats().skipped_share > 0.0


def test_inspect_reads_a_stock_gguf(converted, capsys):
    assert main(["inspect", str(converted("q8_0"))]) == 0
    out = capsys.readouterr().out
    assert "Q8_0 (all)" in out and "blk.1 down" in out


def test_infeasible_budget_fails_before_calibrating_and_writes_nothing(tiny_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    import mc_gguf.pipeline as compress_module

    def must_not_calibrate(*args, **kwargs):
        raise AssertionError("calibration ran for an infeasible budget")

    monkeypatch.setattr(compress_module, "calibrate", must_not_calibrate)
    out = tmp_path / "out.gguf"
    assert main(["compress", str(tiny_model_dir), "--bits", "1.2", "-q", "-o", str(out)]) == 1
    assert "feasible budgets are 1.562 to 8.500" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_compress_to_a_file_size_writes_a_file_of_at_most_that_size(tiny_model_dir, tmp_path, capsys):
    """--size: the real file, with every mc.* key and the pruning thresholds, fits; the experts took the room
    (more bits than Q4_K's, where every expert at Q4_K and the rest at Q8_0 would fit), the other tensors sharing it
    where --tensor-type does not fix them."""
    from mc_gguf.allocate.allocation import uniform_plan
    from mc_gguf.allocate.size import predict
    from mc_gguf.hf.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_model_dir)
    predicted = [predict(ckpt, uniform_plan(ckpt, t)) for t in ("Q4_K", "Q8_0")]
    sizes = [p["file_bytes"] for p in predicted]
    size = sum(sizes) // 2
    out = tmp_path / "sized.gguf"
    assert main(["compress", str(tiny_model_dir), "--size", str(size), "--types", *TEST_TYPES, "--tokens", "512",
                 "--seq-len", "128", "--no-tune", "--odp-skip", "0.25", "--tensor-type", "attn=Q6_K", "-q",
                 "-o", str(out)]) == 0
    assert sizes[0] < size and out.stat().st_size <= size
    attention = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if t.name.startswith("blk.0.attn_q.")}
    assert attention == {"Q6_K"}  # --tensor-type, whose bytes the budget paid
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mc"]["mc.plan.scope"] == "model"
    assert info["expert_bpw"] > 4.5  # Q4_K's bits per weight
    # the plan's budget is the size less the most that pruning's mean outputs take beside it (prune/means.py:
    # a file that groups its experts carries them)
    from mc_gguf.prune.means import means_bytes

    assert info["mc"]["mc.plan.budget_bpw"] == pytest.approx(8 * (size - means_bytes(ckpt)) / predicted[0]["n_weights"],
                                                             rel=1e-6)


def test_a_file_size_too_small_fails_before_calibrating_and_writes_nothing(tiny_model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    import mc_gguf.pipeline as compress_module

    monkeypatch.setattr(compress_module, "calibrate", lambda *a, **k: pytest.fail("calibration ran"))
    assert main(["compress", str(tiny_model_dir), "--size", "100K", "-q", "-o", str(tmp_path / "out.gguf")]) == 1
    err = capsys.readouterr().err
    assert "a file of 100,000 bytes is smaller than" in err and "--tensor-type" in err, err
    assert list(tmp_path.iterdir()) == []
