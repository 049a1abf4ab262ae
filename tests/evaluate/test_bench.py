"""`mc-gguf bench`: llama-bench's tests (ppN, tgN) on the patched runtime, with and without pruning.

The speeds themselves vary with the machine; what is checked is what they are made of: every timed run decoded
its tokens (the runtime's own slot counters count n_used slots per token and layer), each speed is the tokens
over the run's time, pruning skips slots only when on, and the bytes a token reads agree with a count made here
from the tensors' shapes and ggml's block sizes.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from mc_gguf.evaluate.bench import TokenBytes, token_bytes
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.edit import float_array, rewrite_metadata
from mc_gguf.gguf_io.regroup import regroup_experts
from mc_gguf.hf.tiny import TinyMixtralSpec

SPEC = TinyMixtralSpec()
MU = 0.9  # skips about a third of the tiny model's slots (tests/evaluate/test_serve.py)


def mc_gguf(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mc_gguf.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def bench_json(*args: str) -> list[dict]:
    result = mc_gguf("bench", *args, "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def reference_token_bytes(path: Path) -> TokenBytes:
    """The same quantity from the tensors' shapes and gguf-py's table of ggml block sizes (not their offsets)."""
    reader = gguf.GGUFReader(path)
    n_layers, dense = SPEC.num_hidden_layers, 0
    experts, means = np.zeros(n_layers), np.zeros(n_layers)
    for t in reader.tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        size = int(np.prod(t.shape)) // block * type_size
        if t.name == "token_embd.weight":
            continue
        if "_exps" in t.name:
            experts[int(t.name.split(".")[1])] += size
        elif t.name.endswith(".ffn_odp_mean.weight"):   # a skipped slot reads one row: its expert's
            means[int(t.name.split(".")[1])] += size
        else:
            dense += size
    return TokenBytes(dense, list(experts / SPEC.num_local_experts), [SPEC.num_experts_per_tok] * n_layers,
                      list(means / SPEC.num_local_experts))


def test_bytes_a_token_reads_match_the_tensor_shapes_in_both_layouts(converted, tmp_path):
    stock = converted("q8_0")
    need = token_bytes(stock)
    assert need == reference_token_bytes(stock)
    assert need.per_token() == pytest.approx(need.dense + sum(need.expert_mean) * SPEC.num_experts_per_tok)
    # the per-expert layout's groups hold the same bytes: a token reads the same
    half = SPEC.num_local_experts // 2
    grouped = regroup_experts(stock, tmp_path / "grouped.gguf",
                              {0: list(range(half)), 1: list(range(half, SPEC.num_local_experts))})
    assert token_bytes(grouped) == need
    # skipping a share of a layer's slots saves that share of its experts' bytes
    shares = [0.5] + [0.0] * (SPEC.num_hidden_layers - 1)
    assert need.per_token() - need.per_token(shares) == pytest.approx(0.5 * SPEC.num_experts_per_tok *
                                                                      need.expert_mean[0])
    # pruning's mean outputs (one F32 row per expert) are not read unpruned; a skipped slot reads its row
    from mc_gguf.gguf_io.edit import rewrite_tensors
    from mc_gguf.gguf_io.layout import odp_mean_name
    from mc_gguf.gguf_io.write import OutputTensor

    mean = np.ones((SPEC.num_local_experts, SPEC.hidden_size), np.float32)
    with_means = rewrite_tensors(grouped, tmp_path / "means.gguf", {}, add=[OutputTensor(
        odp_mean_name(0), mean.shape, gguf.GGMLQuantizationType.F32, lambda: mean)])
    carried = token_bytes(with_means)
    assert carried == reference_token_bytes(with_means) and carried.per_token() == need.per_token()
    assert carried.mean_row[0] == 4 * SPEC.hidden_size and not any(carried.mean_row[1:])
    assert carried.per_token(shares) - need.per_token(shares) == pytest.approx(
        0.5 * SPEC.num_experts_per_tok * 4 * SPEC.hidden_size)


@pytest.fixture(scope="module")
def pruned_file(converted, tmp_path_factory) -> Path:
    """The Q8_0 file with a pruning threshold in its metadata, as odp-calibrate writes one."""
    path = tmp_path_factory.mktemp("bench") / "odp.gguf"
    rewrite_metadata(converted("q8_0"), path, {keys.ODP_MU: float_array([MU] * SPEC.num_hidden_layers)})
    return path


def test_each_run_decodes_its_tokens_and_pruning_skips_only_when_on(pruned_file):
    n_prompt, n_gen, reps = 48, 16, 3
    rows = bench_json(str(pruned_file), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps), "-b", "32")
    assert [(r["test"], r["odp"]) for r in rows] == [(f"pp{n_prompt}", False), (f"tg{n_gen}", False),
                                                     (f"pp{n_prompt}", True), (f"tg{n_gen}", True)]
    layers, used = SPEC.num_hidden_layers, SPEC.num_experts_per_tok
    for r in rows:
        n = r["n_prompt"] + r["n_gen"]
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == reps
        # the warm-up is not counted; every timed token went through the routers, but in the last layer a prompt
        # batch keeps only the token whose logits are read (llama.cpp's inp_out_ids), one per decode call of -b
        last_layer_tokens = -(-n // 32) if r["n_prompt"] else n
        assert r["slots_computed"] + r["slots_skipped"] == reps * used * ((layers - 1) * n + last_layer_tokens)
        # samples_ts as llama-bench prints them, to 3 decimals
        assert r["samples_ts"] == pytest.approx([n * 1e9 / ns for ns in r["samples_ns"]], rel=0, abs=5e-4)
        assert r["avg_ts"] == pytest.approx(statistics.fmean(r["samples_ts"]), rel=0, abs=5e-4)
        assert r["stddev_ts"] == pytest.approx(statistics.stdev(r["samples_ts"]), rel=1e-3)
        assert r["model_n_params"] > 0 and r["model_size"] > pruned_file.stat().st_size * 0.9
        assert r["backends"] == "CPU" and r["n_batch"] == 32
        if not r["odp"]:
            assert r["slots_skipped"] == 0 and r["skipped_share"] == 0
    plain, pruned = rows[1], rows[3]
    assert pruned["skipped_share"] > 0.05
    need = token_bytes(pruned_file)
    assert plain["bytes_per_token"] == pytest.approx(need.per_token())
    assert need.per_token() > pruned["bytes_per_token"] >= need.per_token() * (1 - pruned["skipped_share"])
    assert pruned["ceiling_speedup"] == pytest.approx(plain["bytes_per_token"] / pruned["bytes_per_token"])
    assert pruned["speedup"] == pytest.approx(pruned["avg_ts"] / plain["avg_ts"])


def test_a_file_without_thresholds_runs_unpruned_unless_mu_is_given(converted):
    stock = str(converted("q8_0"))
    rows = bench_json(stock, "-p", "0", "-n", "8", "-r", "2")
    assert [(r["test"], r["odp"]) for r in rows] == [("tg8", False)]
    rows = bench_json(stock, "-p", "0", "-n", "8", "-r", "2", "--mu", str(MU))
    assert [(r["test"], r["odp"], r["skipped_share"] > 0) for r in rows] == [("tg8", False, False),
                                                                             ("tg8", True, True)]
    rows = bench_json(stock, "-p", "8,16", "-n", "0", "-r", "1", "--odp", "1", "--mu", str(MU))
    assert [(r["test"], r["odp"]) for r in rows] == [("pp8", True), ("pp16", True)]


def test_markdown_jsonl_and_csv_carry_the_same_tests(pruned_file):
    common = [str(pruned_file), "-p", "16", "-n", "4", "-r", "2", "--no-warmup"]
    md = mc_gguf("bench", *common)
    assert md.returncode == 0, md.stderr
    lines = md.stdout.splitlines()
    assert lines[0] == "| model | size | params | backend | threads | odp | test | t/s | skipped |"
    tests = [line.split(" | ")[6] for line in lines[2:6]]
    assert tests == ["pp16", "tg4", "pp16", "tg4"]
    assert any(line.startswith("tg4 with pruning:") and "at most" in line for line in lines)
    jsonl = mc_gguf("bench", *common, "-o", "jsonl")
    assert [json.loads(line)["test"] for line in jsonl.stdout.splitlines()] == tests
    table = list(csv.DictReader(io.StringIO(mc_gguf("bench", *common, "-o", "csv").stdout)))
    assert [row["test"] for row in table] == tests
    assert all(len(json.loads(row["samples_ns"])) == 2 for row in table)


@pytest.mark.parametrize("args, needle", [
    (["-p", "0", "-n", "0"], "no test to run"),
    (["-c", "8", "-p", "64", "-n", "0"], "cannot hold the largest test's 64 tokens"),
])
def test_impossible_settings_are_refused_before_loading(pruned_file, args, needle):
    result = mc_gguf("bench", str(pruned_file), *args)
    assert result.returncode == 1 and needle in result.stderr and "Traceback" not in result.stderr
    assert "llama" not in result.stdout


@pytest.mark.parametrize("args", [["--odp", "2"], ["-p", "-5"], ["-o", "sql"], ["-r", "0"]])
def test_bad_flags_show_the_bench_usage(pruned_file, args):
    result = mc_gguf("bench", str(pruned_file), *args)
    assert result.returncode == 2 and result.stderr.startswith("usage: mc-gguf bench")
