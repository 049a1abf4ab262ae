"""One command from checkpoint to a running mixed-precision GGUF, and inspect on what it wrote."""

from __future__ import annotations

import json

import pytest

from mc_gguf.cli import main
from mc_gguf.loader.model import load

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
    assert info["mc"]["mc.quantize.tune_iters"] == (0 if tune else 8)
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
