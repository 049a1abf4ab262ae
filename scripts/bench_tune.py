#!/usr/bin/env python3
"""GPTQ, tuning and the down projection's fit at Mixtral 8x7B's shapes: seconds per expert projection and type.

A projection at the real shapes, gate/up [14336, 4096] on a 4096-input Hessian and down [4096, 14336] on a
14336-input one, random weights and a Hessian of correlated inputs (a rank-256 mixing plus the identity; its
content does not change the cost). For each projection: the Hessian's GPTQ factor (once per expert and
input), then for each type GPTQ and tuning on it, timed apart; and down's ridge fit to the quantized gate and
up (hessian.py: the held-out choice among three ridges fit on one fold, then the fit), on folds of the same
sizes, and, where the version has it, hessian.fit_down (the two together, consuming the folds' sums) with
its peak resident memory over the sums'. ``--rows`` takes the first rows of each projection (tuning's cost is linear in the rows, the factor
and the fit's factorizations are not: the report gives both, and per-expert estimates at full rows). Prints
one JSON object; run it against another checkout of the package with PYTHONPATH to compare two versions on
the same machine.

The attention's matrices (``--projections attn_q attn_kv attn_hessians``): q and o [4096, 4096] and k and v
[1024, 4096] (Mixtral's 8 key-value heads) tuned alike on a 4096-input Hessian, and what calibrate --hessian
adds per layer for them, the two sums of x x^T over 16,384 tokens (calibrate/tensors.py's Gram).

    python scripts/bench_tune.py [--rows 2048] [--types Q2_K IQ2_XS] [--iters 4] [--json t.json]
    python scripts/bench_tune.py --quick   (small shapes: checks the script)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
from bench_common import add_output_flags, emit_json

MIXTRAL = {"hidden": 4096, "ff": 14336, "kv": 1024}


def correlated_hessian(n: int, rng: np.random.Generator) -> np.ndarray:
    """X^T X of inputs mixed by a rank-256 map plus the identity, built without the tokens."""
    mixing = rng.standard_normal((n, 256)).astype(np.float32) / 16
    h = mixing @ mixing.T
    h[np.diag_indices_from(h)] += 1.0
    return h


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_projection(name: str, rows: int, cols: int, full_rows: int, types: list[str], iters: int,
                     rng: np.random.Generator) -> dict:
    import gguf

    from mc_gguf.quantize import gptq, tune

    weights = (0.02 * rng.standard_normal((rows, cols))).astype(np.float32)
    hessian = correlated_hessian(cols, rng)
    imatrix = np.diag(hessian).astype(np.float32) / cols
    shared = getattr(gptq, "Hessian", None)
    report = {"rows": rows, "cols": cols, "full_rows": full_rows, "types": {}}
    if shared is not None:  # this version factors once per (expert, input)
        h = shared(hessian)
        _, report["factor_s"] = timed(lambda: h.factor)
        _, report["damped_s"] = timed(lambda: h.damped)
    else:
        h = hessian
        _, report["factor_s"] = timed(lambda: gptq.inverse_hessian_factor(hessian))
    for t in types:
        qtype = gguf.GGMLQuantizationType[t]
        _, gptq_s = timed(lambda q=qtype: gptq.gptq_quantize(weights, h, q, imatrix))
        _, tune_s = timed(lambda q=qtype: tune.tune_quantize(weights, h, q, imatrix, tune.TuneSettings(iters=iters)))
        # tune_quantize includes its GPTQ start and, in a version without a shared Hessian, its factor
        report["types"][t] = {"gptq_s": gptq_s, "tune_quantize_s": tune_s}
        if t in getattr(tune.iquants, "LATTICES", ()):   # a version whose tuning can move the grid points
            # the same with the grid points moved too (--tune-lattice)
            _, report["types"][t]["tune_quantize_lattice_s"] = timed(lambda q=qtype: tune.tune_quantize(
                weights, h, q, imatrix, tune.TuneSettings(iters=iters, lattice=True)))
    return report


def bench_down_fit(hidden: int, ff: int, rng: np.random.Generator) -> dict:
    """hessian.py's held-out ridge choice and fit at down's shapes, on two folds of a synthetic H' and b."""
    from mc_gguf.quantize import hessian as hs

    w = (0.02 * rng.standard_normal((hidden, ff))).astype(np.float64)
    h = [correlated_hessian(ff, rng).astype(np.float64) for _ in range(2)]
    b = [m @ w.T * 0.9 for m in h]  # C^T W^T of a gate and up that changed z a little
    # since DownSums: the sums over all tokens and over the first fold, where both folds' sums were handed over
    sums = hs.DownSums.of_folds if hasattr(hs, "DownSums") else lambda h, b: (h, b)
    ridge, choose_s = timed(lambda: hs._held_out_ridge(w, *((sums(h, b),) if hasattr(hs, "DownSums") else (h, b))))
    _, fit_s = timed(lambda: hs._ridge_fit(w, h[0] + h[1], b[0] + b[1], ridge or 0.01))
    report = {"hidden": hidden, "ff": ff, "ridge": ridge, "choose_s": choose_s, "fit_s": fit_s}
    if hasattr(hs, "fit_down"):  # this version: choice and fit in one call that consumes the sums
        args = (sums(h, b),) if hasattr(hs, "DownSums") else (h, b)
        del h, b
        inputs = resident_gib()
        (target, peak), report["fit_down_s"] = timed(lambda: with_peak_resident(lambda: hs.fit_down(w, *args)))
        report["fit_down_inputs_gib"] = round(inputs, 3)
        report["fit_down_peak_gib_over_inputs"] = round(peak - inputs, 3)
        # where the fit's factorization is GPTQ's too, down's own factor is not computed again
        report["fit_down_factors_for_gptq"] = "factor" in getattr(target.hessian, "__dict__", {})
    return report


def per_expert(report: dict) -> dict:
    """Seconds per expert and type at full rows: gate and up tuned on one factor, down's fit (its ridge's
    choice included), down tuned on its factor (the fit's, where fit_down makes it)."""
    gate, down, fit = report["gate"], report["down"], report["down_fit"]
    fit_s = fit.get("fit_down_s", fit["choose_s"] + fit["fit_s"])
    down_factor_s = 0.0 if fit.get("fit_down_factors_for_gptq") else down["factor_s"]
    return {t: gate["factor_s"] + 2 * gate["types"][t]["tune_quantize_full_rows_s_est"] + fit_s + down_factor_s
            + down["types"][t]["tune_quantize_full_rows_s_est"] for t in gate["types"] if t in down["types"]}


def resident_gib() -> float:
    """This process's resident memory now (VmRSS), in GiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 2 ** 20


def with_peak_resident(fn):
    """(fn's value, the most resident memory the process had while fn ran, in GiB), sampled every 50 ms."""
    import threading

    peak, done = [resident_gib()], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], resident_gib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        value = fn()
    finally:
        done.set()
        sampler.join()
    return value, max(peak[0], resident_gib())


def bench_error_pass(hidden: int, ff: int, features: int, tokens: int, shares: list[int]) -> dict:
    """calibrate's error pass on one expert (quant_error.expert_errors: every candidate type, on a sample of
    ``features`` of its ff) with the i-quants on the whole sample and on a share of it."""
    import torch

    from mc_gguf.calibrate.quant_error import (
        RATIO_REFERENCE,
        ExpertWeights,
        expert_errors,
        feature_sample,
    )
    from mc_gguf.ggml.types import CANDIDATES
    from mc_gguf.hf.architectures import ExpertActivation

    g = torch.Generator().manual_seed(0)
    w = ExpertWeights(*(torch.randn(*s, generator=g).to(torch.bfloat16) * 0.02
                        for s in ((ff, hidden), (ff, hidden), (hidden, ff))))
    x, route = torch.randn(tokens, hidden, generator=g), torch.rand(tokens, generator=g)
    rng = np.random.default_rng(0)
    imatrix_in, imatrix_mid = (np.abs(rng.standard_normal(n)).astype(np.float32) for n in (hidden, ff))
    glu = ExpertActivation.ACT.glu({"hidden_act": "silu"})
    sample = feature_sample(ff, features, rng)
    types = list(CANDIDATES)
    report, errors = {"ff": ff, "features": features, "tokens": tokens}, {}
    for share in shares:
        errors[share], report[f"share_{share}_s"] = timed(
            lambda k=share: expert_errors(w, x, route, glu, types, imatrix_in, imatrix_mid, sample, k))
    iq = [types.index(t) for t in RATIO_REFERENCE if t in types]
    for share in shares[1:]:
        report[f"share_{share}_iquants_max_relative_difference"] = float(
            np.max(np.abs(errors[share][:, iq] / errors[shares[0]][:, iq] - 1)))
    return report


def bench_attention_hessians(hidden: int) -> dict:
    """The two Gram sums of a layer's attention inputs (q, k, v's and o's) over HESSIAN_TOKENS, in batches of 4096
    tokens as the layer's forward gives them, and the share of both cores they kept busy."""
    import torch

    from mc_gguf.calibrate.tensors import HESSIAN_TOKENS, Gram

    batch = torch.randn(4096, hidden)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(2):
        gram = Gram(HESSIAN_TOKENS)
        for _ in range(0, HESSIAN_TOKENS, len(batch)):
            gram.add(batch)
        gram.reader()
    wall = time.perf_counter() - start
    return {"tokens": HESSIAN_TOKENS, "seconds_per_layer": wall,
            "cpu_utilisation": (time.process_time() - cpu) / wall / (os.cpu_count() or 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=0, help="rows of each projection (default 0: all)")
    parser.add_argument("--types", nargs="+", default=["Q2_K", "IQ2_XS"], help="types (default: Q2_K IQ2_XS)")
    from mc_gguf.quantize.settings import TuneSettings

    iters = TuneSettings().iters
    parser.add_argument("--iters", type=int, default=iters,
                        help=f"tuning sweeps at most (default: {iters}, compress's)")
    parser.add_argument("--projections", nargs="+", default=["gate", "down", "down_fit", "error_pass"],
                        choices=["gate", "down", "down_fit", "error_pass", "attn_q", "attn_kv", "attn_hessians"],
                        help="what to time (default: the expert's four; error_pass is calibrate's, per expert, on 2048 "
                        "features and 2048 tokens, with the i-quants on all of them and on a quarter; attn_q and "
                        "attn_kv a layer's q (or o) and k (or v), attn_hessians their Hessians' sums)")
    add_output_flags(parser, quick_help="small shapes: checks the script")
    args = parser.parse_args()
    import torch

    import mc_gguf

    dims = {"hidden": 512, "ff": 1024, "kv": 256} if args.quick else MIXTRAL
    rng = np.random.default_rng(0)
    report = {"package": os.path.dirname(mc_gguf.__file__), "torch_threads": torch.get_num_threads(),
              "iters": args.iters, "quick": args.quick}
    shapes = {"gate": (dims["ff"], dims["hidden"]), "down": (dims["hidden"], dims["ff"]),
              "attn_q": (dims["hidden"], dims["hidden"]), "attn_kv": (dims["kv"], dims["hidden"])}
    for name in args.projections:
        if name == "attn_hessians":
            report[name] = bench_attention_hessians(dims["hidden"])
            continue
        if name == "down_fit":
            report[name] = bench_down_fit(dims["hidden"], dims["ff"], rng)
            continue
        if name == "error_pass":
            report[name] = bench_error_pass(dims["hidden"], dims["ff"], 1024 if args.quick else 2048,
                                            256 if args.quick else 2048, [1, 4])
            continue
        full_rows, cols = shapes[name]
        rows = min(args.rows or full_rows, full_rows)
        r = bench_projection(name, rows, cols, full_rows, args.types, args.iters, rng)
        scale = full_rows / rows
        for times in r["types"].values():
            # per full projection: the factor once, GPTQ's and tuning's row-linear parts scaled to all rows
            times["tune_quantize_full_rows_s_est"] = times["tune_quantize_s"] * scale
            if "tune_quantize_lattice_s" in times:
                times["tune_quantize_lattice_full_rows_s_est"] = times["tune_quantize_lattice_s"] * scale
        report[name] = r
    if {"gate", "down", "down_fit"} <= set(report):
        report["per_expert_s_est"] = per_expert(report)
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    emit_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
