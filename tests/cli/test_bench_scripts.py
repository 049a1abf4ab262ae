"""The benchmark scripts run end to end in their --quick mode (figures are not asserted: speed is no test).

bench_speed, bench_quality, bench_scale and bench_layouts take minutes each even so (a stock llama.cpp's tools,
calibration with Hessians, tuning, several files): they are marked ``bench`` and run by ``make test-bench``, not
``make test``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_script(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "report.json"
    png = tmp_path / "report.png"
    result = subprocess.run([sys.executable, str(SCRIPTS / name), "--quick", "--workdir", str(tmp_path / "work"),
                             "--json", str(out), "--png", str(png), *extra], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert png.stat().st_size > 0
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.bench
def test_bench_speed_quick(tmp_path):
    report = run_script("bench_speed.py", tmp_path)
    cases = {c["name"]: c for c in report["cases"]}
    assert {"uniform Q4_K", "per-expert Q3_K/Q4_K/Q5_K"} <= set(cases)
    for case in cases.values():
        assert case["decode_tok_s"] > 0 and case["prefill_tok_s"] > 0 and case["limit_tok_s"] > 0
    # the mixed file holds the same weights in about the same bytes as the uniform one (4.48 vs 4.5 bits)
    assert abs(report["model"]["per_expert_file_mb"] / report["model"]["file_mb"] - 1) < 0.02
    assert cases["uniform Q4_K"]["decode_skip_share"] == 0.0
    pruned = [c for c in cases.values() if c["target_skip"]]
    assert len(pruned) == 3 and all(c["decode_skip_share"] > 0 for c in pruned)
    # a pruned decode reads fewer expert bytes, so its bandwidth limit is higher
    assert all(c["bytes_per_token"] < cases["uniform Q4_K"]["bytes_per_token"] for c in pruned)
    # the paired comparison: every layout and type against the uniform file, itself at exactly 1
    paired = report["paired_decode"]["files"]
    assert set(paired) == {"uniform Q4_K", "per-expert layout, one Q4_K group", "per-expert Q3_K/Q4_K/Q5_K",
                           "per-expert layout, three Q4_K groups", "uniform Q3_K", "uniform Q5_K"}
    assert paired["uniform Q4_K"]["speed_ratio"] == 1.0
    assert all(r["speed_ratio"] > 0 and r["decode_tok_s"] > 0 for r in paired.values())
    # the pruned decodes paired with the unpruned one: a higher threshold skips more, and the
    # bandwidth limit's ratio follows the skipped share (expert bytes only)
    odp = report["odp_decode"]
    assert set(odp) == {c["name"] for c in pruned}
    rows = sorted(odp.values(), key=lambda r: r["mu"])
    shares = [r["paired_skip_share"] for r in rows]
    assert shares == sorted(shares) and shares[-1] > 0
    for row in rows:
        assert 0 < row["expert_share_of_token_bytes"] < 1 and row["paired_decode_ratio"] > 0
        expected = 1 / (1 - row["expert_share_of_token_bytes"] * row["paired_skip_share"])
        assert abs(row["bandwidth_limit_ratio"] - expected) < 1e-9
    # bench_odp.py's view of the same model: the uniform file (reused) and its paired pruned decodes
    code = ("import json, sys; from pathlib import Path; from bench_speed import odp_speed; "
            f"print(json.dumps(odp_speed(Path({str(tmp_path / 'work')!r}), [0.25], quick=True)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=SCRIPTS, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(result.stdout.strip().splitlines()[-1])["odp_decode"].values()
    assert row["paired_skip_share"] > 0 and row["bandwidth_limit_ratio"] > 1 and "separate_decode_ratio" not in row


@pytest.mark.slow
@pytest.mark.bench
def test_bench_quality_quick(tmp_path):
    # the AutoRound peer comes with make test-bench (pip install -e .[peers])
    report = run_script("bench_quality.py", tmp_path, "--autoround")
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["F16"]["kld_mean"] == 0.0 and rows["F16"]["same_top_token"] == 1.0
    families = {r["family"] for r in rows.values()}
    assert families == {"reference", "llama.cpp recipe", "llama.cpp experts", "mc-gguf", "AutoRound"}
    # AutoRound's tuned Q2_K experts, every other tensor Q8_0 (as bench_quality's expert frontier)
    peer = rows["AutoRound experts Q2_K iters 2"]
    assert peer["expert_bpw"] == pytest.approx(2.625) and 0 < peer["kld_mean"] < rows["llama.cpp Q2_K"]["kld_mean"] * 10
    assert all("kld_over_autoround_at_same_size" in r for r in rows.values() if r["family"] == "mc-gguf")
    # llama.cpp's own tools wrote the uniform-expert file: its experts are IQ2_XS (2.3125 bits per weight)
    assert rows["llama.cpp experts IQ2_XS"]["expert_bpw"] == pytest.approx(2.3125)
    for name in ("mc-gguf per-expert 2.5", "mc-gguf stock 2.5"):
        assert rows[name]["expert_bpw"] <= 2.5 + 1e-9
        assert rows[name]["kld_mean"] > 0 and math.isfinite(rows[name]["ppl"])
    assert rows["mc-gguf per-expert 2.5 odp 25%"]["skipped_share"] > 0
    assert rows["mc-gguf per-expert 2.5"]["skipped_share"] == 0


@pytest.mark.slow
@pytest.mark.bench
def test_bench_quality_whole_file_quick(tmp_path):
    report = run_script("bench_quality.py", tmp_path, "--whole-file", "--sets", "chosen", "chosen untuned")
    rows = {r["name"]: r for r in report["rows"]}
    recipe = rows["llama.cpp Q4_K_M"]
    made = [r for r in rows.values() if r["family"] == "mc-gguf"]
    assert {r["non_expert"] for r in made} == {"chosen", "chosen untuned"}
    for row in made:
        # compress --size: the file written is at most the recipe's bytes, and is scored against it
        assert row["size_of"] == "llama.cpp Q4_K_M" and row["file_mb"] <= recipe["file_mb"]
        assert row["kld_over_that_recipe"] == pytest.approx(row["kld_mean"] / recipe["kld_mean"])
        assert 0 < row["kld_mean"] and math.isfinite(row["ppl"])


@pytest.mark.slow
@pytest.mark.bench
def test_bench_block_objective_quick(tmp_path):
    report = run_plain_script("bench_block_objective.py", tmp_path)
    # the per-row descent, handed every row the same Hessian, moves exactly as tune.py's
    assert report["row_descent_bytes_differing"] == 0.0
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"projection", "projection, sampled", "expert output, per row", "expert output, shared"}
    assert rows["projection"]["eval_change"] == 0.0
    for row in rows.values():
        assert row["eval_kld"] > 0 and math.isfinite(row["eval_change"])
        assert row["file_mb"] == rows["projection"]["file_mb"]   # the same plan: the same types and bytes


@pytest.mark.slow
@pytest.mark.bench
def test_bench_split_quick(tmp_path):
    report = run_plain_script("bench_split.py", tmp_path)
    rows = {r["name"]: r for r in report["rows"]}
    for row in rows.values():   # every byte of a file is in one class
        assert sum(row["bytes"].values()) == pytest.approx(row["file_mb"] * 1e6)
    assert {r["class"] for r in rows.values()} >= {"base", "token_embd", "output", "attn", "experts", "file"}
    (split,) = report["splits"]
    # the exhaustive choice fits the target, and no mixture of the points goes below the linear program's bound
    assert split["best_choice_bytes"] <= report["target_bytes"]
    assert split["bound_kld"] <= split["best_choice_kld"] + 1e-12
    assert split["best_choice_kld"] == pytest.approx(
        rows["base"]["kld_mean"] + sum(c["kld_increment"] for c in split["best_choice"].values()))
    assert sum(split["file_bytes"].values()) <= report["target_bytes"]
    for cls, mixture in split["bound_mixture"].items():
        assert sum(mixture.values()) == pytest.approx(1, abs=1e-3)


def run_plain_script(name: str, tmp_path: Path, *extra: str, workdir: bool = True) -> dict:
    out = tmp_path / "report.json"
    where = ["--workdir", str(tmp_path / "work")] if workdir else []
    result = subprocess.run([sys.executable, str(SCRIPTS / name), "--quick", *where, "--json", str(out), *extra],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.bench
def test_bench_scale_quick(tmp_path):
    report = run_plain_script("bench_scale.py", tmp_path, "--resume-check")
    assert set(report["runs"]) == {"1", "2"}
    for run in report["runs"].values():
        stages = run["stages"]
        assert {"mc convert", "llama convert", "mc calibrate", "mc quantize", "llama-imatrix",
                "llama-quantize"} <= set(stages)
        assert all(s["seconds"] > 0 and s["peak_rss_gib"] > 0 for s in stages.values())
        if sys.platform.startswith("linux"):
            # anonymous memory is part of the resident set (sampled, so it may miss a short peak)
            assert all(0 < s["peak_anon_gib"] <= s["peak_rss_gib"] + 0.01 for s in stages.values())
        # killed part-way and run again: the statistics of the uninterrupted run
        assert run["calibrate_killed_and_resumed"]["same_statistics"] is True
    assert report["memory_flatness"]["mc calibrate"] > 0


@pytest.mark.slow
@pytest.mark.bench
def test_bench_layouts_quick(tmp_path):
    report = run_plain_script("bench_layouts.py", tmp_path)
    rows = {r["layout"]: r for r in report["rows"]}
    assert set(rows) == {"per-expert", "stock"} and all(r["bits"] == 2.5 for r in rows.values())
    for row in rows.values():
        assert row["expert_bpw"] <= 2.5 + 1e-9 and row["compress_s"] > 0
        assert row["kld_mean"] > 0 and math.isfinite(row["ppl"])
    # only the per-expert file has tensors of its own per group of experts; the stock file is llama.cpp's layout
    assert rows["per-expert"]["group_tensors"] > 0 and rows["stock"]["group_tensors"] == 0
    assert "--layout stock" in rows["stock"]["command"] and "--layout" not in rows["per-expert"]["command"]
    ratio = report["stock_over_per_expert"]["2.5"]
    assert ratio["kld_mean"] == pytest.approx(rows["stock"]["kld_mean"] / rows["per-expert"]["kld_mean"])


@pytest.mark.slow
def test_bench_eps_sampling_quick(tmp_path):
    report = run_plain_script("bench_eps_sampling.py", tmp_path)
    assert report["full"]["eps_features"] == 512 and report["sampled"]["eps_features"] == 256
    assert report["kld_sampled_over_full"] > 0 and 0 <= report["experts_with_the_same_types"] <= 1


@pytest.mark.slow
@pytest.mark.bench
def test_bench_scale_defaults_quick(tmp_path):
    report = run_plain_script("bench_scale.py", tmp_path, "--defaults")
    assert set(report["runs"]) == {"1", "2"}
    for run in report["runs"].values():
        assert {"mc compress", "llama-imatrix", "llama-quantize IQ2_XS", "llama-quantize IQ2_S"} <= set(run["stages"])
        assert all(s["seconds"] > 0 and 0 < s["cpu_use"] <= 1.05 for s in run["stages"].values())
        trace = run["stages"]["mc compress"]["memory_trace"]
        assert trace["peak_anon_gib"] > 0 and trace["peak_anon_gib_by_function"]
    assert report["compress_over_imatrix+quantize_IQ2_XS_per_added_layer"] is not None
    assert 0 <= report["compress_fixed_share_of_full_model"] <= 1


@pytest.mark.slow
@pytest.mark.bench
def test_bench_scale_calibrate_only_quick(tmp_path):
    report = run_plain_script("bench_scale.py", tmp_path, "--calibrate-only")
    for run in report["runs"].values():
        assert set(run["stages"]) == {"mc convert", "mc calibrate", "llama-imatrix"}
        assert run["ratios"]["calibrate_over_imatrix"] > 0
    ratio = report["calibrate_over_imatrix_per_layer"]   # None where imatrix's added tiny layer took no time
    assert ratio is None or ratio > 0


@pytest.mark.slow
def test_bench_tune_quick(tmp_path):
    report = run_plain_script("bench_tune.py", tmp_path, workdir=False)
    for projection in ("gate", "down"):
        assert report[projection]["factor_s"] > 0
        assert all(t["gptq_s"] > 0 and t["tune_quantize_s"] > 0 for t in report[projection]["types"].values())
    assert report["down_fit"]["choose_s"] > 0
    # a quarter of the 4 blocks: the i-quants' estimate is near their measurement on all of them
    assert report["error_pass"]["share_4_iquants_max_relative_difference"] < 0.1


def test_trace_memory_samples_a_command_and_keeps_its_exit_status(tmp_path, tiny_model_dir):
    """trace_memory.py runs an mc-gguf command in its own process, samples where its memory is, and exits with the
    command's status: a conversion's samples fall in mc_gguf's functions, a refused input's status comes back."""
    def trace(*command: str) -> tuple[int, dict]:
        report = tmp_path / "trace.json"
        result = subprocess.run([sys.executable, str(SCRIPTS / "trace_memory.py"), "--interval", "0.005",
                                 "--json", str(report), "--", *command], capture_output=True, text=True)
        return result.returncode, json.loads(report.read_text())

    out = tmp_path / "f32.gguf"
    status, report = trace("convert", str(tiny_model_dir), "-o", str(out), "--type", "f32", "-q")
    assert status == 0 and report["exit_status"] == 0 and out.stat().st_size > 0
    assert report["samples"] > 1 and report["peak_anon_gib"] > 0
    functions = report["peak_anon_gib_by_function"]
    assert functions and all(name.startswith("mc_gguf/") for name in functions)
    assert max(functions.values()) <= report["peak_anon_gib"]
    status, report = trace("convert", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "x.gguf"))
    assert status != 0 and report["exit_status"] == status
    assert not (tmp_path / "x.gguf").exists()
