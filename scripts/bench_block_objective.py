#!/usr/bin/env python3
"""Which loss should the tuning of gate and up minimise: each projection's own output error, or the expert's?

compress tunes gate and up on the Hessian of their shared input (H_in = sum_t g_t^2 x_t x_t^T: each
projection's output error, weighted by the routing weight g_t), and then refits down to what the quantized
gate and up give it (quantize/hessian.py), so down already answers to the expert's output. A loss nearer the
block's output sees what the GLU does to gate's and up's errors: to first order, an error d of row j of up
reaches the expert's output as W_down[:, j] * act(z_j) * d.x, and one of gate as W_down[:, j] * act'(z_j) u_j
* d.x (z = x gate^T, u = x up^T). Dropping the cross terms between rows (their errors are independent), each
row j then has its own Hessian

    H_j = sum_t g_t^2 s_tj^2 x_t x_t^T,   s = act(z) for up, act'(z) u for gate

(|W_down[:, j]|^2 scales a row's whole loss, which changes no row's optimum). The objectives compared, each
file made from the same statistics and the same plan (compress's defaults at --bits: the same type for every
projection in every variant), so that only the loss that gate's and up's descent minimises differs:

- ``projection``: compress's default, the shared H_in over every routed token;
- ``projection, sampled``: the same on the --row-tokens sampled tokens the per-row Hessians use;
- ``expert output, per row``: GPTQ on H_in as before, then the descent on each row's H_j (--row-tokens
  sampled tokens: the per-row Hessians are rows x cols^2, 1 TFLOP per projection of the bench model's expert
  over all its tokens, and 960 GB for one of Mixtral 8x7B's);
- ``expert output, shared``: one Hessian per projection with each token weighted by how much the rows'
  errors reach the output on average (H = sum_j c_j H_j / mean(c_j s_j^2), c_j = |W_down[:, j]|^2): the
  row-average of the per-row Hessians, the cost of H_in, every routed token.

Each file is scored against the F16 file on the same windows; the paired difference of the mean KL divergence
from the default's is taken window by window (its standard error over the windows).

    python scripts/bench_block_objective.py [--stats STATS] [--bits 2.25] [--windows 64] [--eval2 TEXT]
    python scripts/bench_block_objective.py --quick   (a tiny model built here: checks the script works)
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import add_input_flags, add_output_flags, add_window_flags, emit_json, statistics

VARIANTS = ("projection", "projection, sampled", "expert output, per row", "expert output, shared")
DEFAULT = VARIANTS[0]


def row_hessians(x: torch.Tensor, g: torch.Tensor, expert, glu) -> dict[str, torch.Tensor]:
    """For gate and up: the per-row Hessians H_j [F, H, H] of the tokens x [n, H] routed with weights g [n, 1],
    linearised through glu at the checkpoint's weights."""
    z = (x @ expert.gate.T).requires_grad_(True)
    u = (x @ expert.up.T).requires_grad_(True)
    glu(z, u).sum().backward()   # the GLU is elementwise: d out_j / d z_j and d out_j / d u_j
    out = {}
    for name, s in (("gate", z.grad), ("up", u.grad)):
        w = (s * g) ** 2                                   # [n, F]: each token's weight for each row
        per_row = torch.empty(w.shape[1], x.shape[1], x.shape[1])
        for top in range(0, w.shape[1], ROW_CHUNK):
            a = x[None] * w[:, top:top + ROW_CHUNK].T.sqrt()[:, :, None]   # [rows, n, H]
            per_row[top:top + ROW_CHUNK] = a.transpose(1, 2) @ a
        out[name] = per_row
    return out


def shared_weighted(x: torch.Tensor, g: torch.Tensor, expert, glu, down_norms: torch.Tensor) -> dict:
    """For gate and up: the row-average Hessian sum_t g_t^2 (sum_j c_j s_tj^2 / mean_t,j(c_j s_tj^2)) x_t x_t^T."""
    z = (x @ expert.gate.T).requires_grad_(True)
    u = (x @ expert.up.T).requires_grad_(True)
    glu(z, u).sum().backward()
    out = {}
    for name, s in (("gate", z.grad), ("up", u.grad)):
        per_token = (s ** 2 * down_norms).sum(1, keepdim=True)
        per_token = per_token / per_token.mean()
        xw = x * g * per_token.sqrt()
        out[name] = (xw.T @ xw).numpy()
    return out


ROW_CHUNK = 64


def make_quantizer(variant: str, row_tokens: int):
    """An ExpertQuantizer whose gate and up are tuned on ``variant``'s Hessians (down as compress does it)."""
    from mc_gguf.calibrate.forward import load_expert
    from mc_gguf.ggml import iquants, kquants
    from mc_gguf.quantize import tune
    from mc_gguf.quantize.experts import ExpertQuantizer
    from mc_gguf.quantize.gptq import Hessian, gptq_quantize

    class Quantizer(ExpertQuantizer):
        _cache: tuple | None = None

        def _block_hessians(self, bid: int, xid: int) -> dict:
            if self._cache is None or self._cache[:2] != (bid, xid):
                self._cache = None
                tokens, g = self.hessians.routed(bid, xid)
                if variant != "expert output, shared":
                    keep = np.sort(np.random.default_rng(bid * 1000 + xid).permutation(len(tokens))[:row_tokens])
                    tokens, g = tokens[keep], g[keep]
                x = self.hessians.inputs(bid)[tokens].float()
                expert = load_expert(self.ckpt, bid, xid).float32()
                norms = (expert.down ** 2).sum(0)
                if variant == "expert output, per row":
                    made = row_hessians(x, g.float(), expert, self.hessians.glu)
                elif variant == "expert output, shared":
                    made = shared_weighted(x, g.float(), expert, self.hessians.glu, norms)
                else:
                    xw = x * g.float()
                    h = (xw.T @ xw).numpy()
                    made = {"gate": h, "up": h}
                self._cache = (bid, xid, made)
            return self._cache[2]

        def _quantize(self, bid, xid, projection, weights=None, hessian=None):
            if variant == DEFAULT or projection == "down" or self.tune is None:
                return super()._quantize(bid, xid, projection, weights, hessian)
            qtype = self._qtype(bid, xid, projection)
            weights = self.ckpt.expert_weight(bid, xid, projection)
            imatrix = self.stats.layers[bid].imatrix("in")[xid]
            made = self._block_hessians(bid, xid)[projection]
            if variant != "expert output, per row":
                return tune.tune_quantize(weights, Hessian(made), qtype, imatrix, self.tune)
            # GPTQ on the shared input Hessian (compress's start), then the descent on each row's own
            start = gptq_quantize(weights, self._shared_input_hessian(bid, xid), qtype, imatrix)
            rows, cols = weights.shape
            if not tune.tunable(qtype, cols):
                return start
            h = damped_rows(made)
            if qtype.name in iquants.FORMATS:
                blocks = tune.tune_scales(weights, h, iquants.unpack(start, qtype.name), self.tune, row_descent())
                return iquants.pack(blocks).reshape(rows, -1)
            blocks = tune.tune_blocks(weights, h, kquants.unpack(start, qtype.name), self.tune, row_descent())
            return kquants.pack(blocks).reshape(rows, -1)

    return Quantizer


def damped_rows(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Each row's H_j + damp * mean(diag H_j) I (GPTQ's dampening, row by row)."""
    diag = torch.diagonal(h, dim1=1, dim2=2)
    mean = diag.mean(1)
    dead = diag == 0
    out = h.clone()
    torch.diagonal(out, dim1=1, dim2=2).add_(damp * mean[:, None] + dead.float())
    return out


def rmul(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Row r of x times row r's matrix: [rows, a] x [rows, a, b] -> [rows, b]."""
    return torch.einsum("ra,rab->rb", x, h)


def _row_descent():
    """tune.py's _Descent with one Hessian per row: every product e H becomes row r's e_r H_r."""
    from mc_gguf.ggml.kquants import QK_K
    from mc_gguf.quantize import tune

    class RowFrame:
        def __init__(self, descent, b: int):
            self.descent, self.cols = descent, slice(b * QK_K, (b + 1) * QK_K)
            self.g = descent.g[:, self.cols].clone()
            self.h = descent.h[:, self.cols, self.cols]
            self.delta = torch.zeros_like(self.g)

        def apply(self, delta, moved=None):
            self.delta += delta
            self.g -= rmul(delta, self.h) if moved is None else moved

        def close(self):
            d = self.descent
            d.e[:, self.cols] -= self.delta
            d.g -= rmul(self.delta, d.h[:, self.cols, :])
            d.g[:, self.cols] = self.g

    class Descent(tune._Descent):
        """Its scales' moves are tune.py's own, with these products and blocks; its codes' moves below."""
        _times = staticmethod(rmul)

        @staticmethod
        def _block(h, rows, cols):
            return h[:, rows, cols]

        def _frame(self, b):
            return RowFrame(self, b)

        def _codes(self, frame, b):
            f = self.fmt
            subs = slice(b * f.n_sub, (b + 1) * f.n_sub)
            unit = self._per_weight(self.d[:, b:b + 1] * self.scales[:, subs]).T.contiguous()   # [256, rows]
            scale = unit * torch.diagonal(frame.h, dim1=1, dim2=2).T
            per_g = torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1.0), 0.0)
            g_block = frame.g.T.contiguous()
            q_block = self.q[:, frame.cols].T
            low, high = f.q_min - q_block, f.q_max - q_block
            moves, steps = torch.empty_like(unit), torch.empty_like(unit)
            chunk_size = tune.CODE_CHUNK
            for first in range(0, QK_K, chunk_size):
                chunk, after = slice(first, first + chunk_size), slice(first + chunk_size, QK_K)
                g_chunk = g_block[chunk]
                for j in range(chunk_size):
                    c = first + j
                    torch.mul(g_block[c], per_g[c], out=moves[c])
                    moves[c].round_().clamp_(-1, 1).clamp_(low[c], high[c])
                    torch.mul(moves[c], unit[c], out=steps[c])
                    g_chunk.sub_((frame.h[:, c, chunk] * steps[c][:, None]).T)
                if after.start < QK_K:
                    g_block[after] -= torch.einsum("rac,cr->ar", frame.h[:, after, chunk], steps[chunk])
            self.q[:, frame.cols] += moves.T
            frame.apply(steps.T)

    return Descent


@functools.cache
def row_descent():
    """The per-row _Descent class, made once (tune.py is imported when it is first asked for)."""
    return _row_descent()


def check_row_descent() -> float:
    """The per-row descent with every row's Hessian the same must move as tune.py's: the share of the bytes
    of a tuned Q3_K and IQ2_XS matrix that differ between the two (float rounding may part them rarely)."""
    from mc_gguf.ggml import iquants, kquants, quants
    from mc_gguf.ggml.types import quant_type
    from mc_gguf.quantize import tune

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 512)).astype(np.float32)
    x = rng.standard_normal((2048, 512)).astype(np.float32) * rng.uniform(0.2, 2, 512).astype(np.float32)
    h = x.T @ x
    h += 0.01 * np.mean(np.diag(h)) * np.eye(512, dtype=np.float32)
    per_row = torch.from_numpy(h)[None].expand(32, -1, -1).contiguous()
    settings = tune.TuneSettings()
    differ = []
    for name in ("Q3_K", "IQ2_XS"):
        qtype = quant_type(name).qtype
        start = quants.quantize(w, qtype, np.diag(h).copy())
        codec, tuner = (iquants, tune.tune_scales) if name in iquants.FORMATS else (kquants, tune.tune_blocks)
        ref = codec.pack(tuner(w, h, codec.unpack(start, name), settings))
        mine = codec.pack(tuner(w, per_row, codec.unpack(start, name), settings, row_descent()))
        differ.append(float(np.mean(np.asarray(ref).reshape(-1) != np.asarray(mine).reshape(-1))))
    return max(differ)


class WindowScores:
    """``scores(path)``: [windows] mean KL divergence of a GGUF from the F16 file, window by window (mc-gguf
    eval's protocol), the F16 file's logits computed once per text."""

    def __init__(self, f16: Path, text: str, windows: int, ctx: int):
        from mc_gguf.evaluate.perplexity import EvalSettings, _windows, reference_logits
        from mc_gguf.loader.model import load

        self.kwargs = dict(n_ctx=ctx, n_batch=ctx, logits_all=True)
        ref = load(f16, odp=False, **self.kwargs)
        ids = ref.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        self.windows = _windows(ids, EvalSettings(n_ctx=ctx, max_windows=windows), ref.token_bos())
        self.logits = reference_logits(ref, self.windows)
        ref.close()

    def __call__(self, path: Path) -> np.ndarray:
        from mc_gguf.evaluate.perplexity import score
        from mc_gguf.loader.model import load

        llm = load(path, odp=False, **self.kwargs)
        result = None
        for result in score(llm, self.windows, self.logits):
            pass
        llm.close()
        return np.asarray(result.kld).reshape(len(self.windows), -1).mean(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_flags(parser)
    parser.add_argument("--eval2", help="a second held-out text, scored alike")
    parser.add_argument("--stats", help="mc-gguf statistics (`mc-gguf calibrate --hessian`; default: calibrate here)")
    parser.add_argument("--bits", type=float, default=2.25, help="the experts' budget (default: 2.25)")
    parser.add_argument("--row-tokens", type=int, default=4096,
                        help="routed tokens per expert the per-row Hessians are summed over (default: 4096)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                        help=f"the objectives compared (default: all; {DEFAULT!r} is always made)")
    add_window_flags(parser)
    add_output_flags(parser, "build/bench-block-objective", quick_help="tiny model: checks the script")
    args = parser.parse_args()

    from bench_quality import Q8_NON_EXPERT, quick_inputs
    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.allocate.cost import COMPRESS_COST
    from mc_gguf.calibrate.calibration import CalibrationSettings
    from mc_gguf.calibrate.text import read_text
    from mc_gguf.gguf_io.convert import convert
    from mc_gguf.quantize import quantization
    from mc_gguf.quantize.tune import TuneSettings
    from mc_gguf.quantize.tuned_errors import tuned_error_ratios

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    settings = CalibrationSettings(hessian=True)
    same = check_row_descent()
    print(f"per-row descent on equal Hessians: {same:.2%} of the bytes differ from tune.py's", file=sys.stderr)
    if args.quick:
        args.model, args.calib, args.eval = quick_inputs(work)
        args.ctx, args.windows, args.row_tokens, args.bits = 64, 4, 256, 2.5
        settings = CalibrationSettings(n_tokens=2048, seq_len=128, eps_tokens=1024, hessian=True,
                                       types=("IQ2_XS", "Q2_K", "Q3_K", "Q4_K"))
    f16 = work / "f16.gguf"
    if not f16.exists():
        convert(args.model, f16, "f16", progress=False)
    stats = statistics(args, work, settings)
    tune = TuneSettings()
    ratios = tuned_error_ratios(args.model, stats, list(stats.types), settings=tune, progress=False)
    plan = allocate(stats, args.bits, model_dir=args.model, non_expert=Q8_NON_EXPERT, error_scale=ratios,
                    per_projection=True, **COMPRESS_COST)

    texts = {"eval": WindowScores(f16, read_text(args.eval).text, args.windows, args.ctx)}
    if args.eval2:
        texts["eval2"] = WindowScores(f16, read_text(args.eval2).text, args.windows, args.ctx)
    variants = [DEFAULT, *(v for v in args.variants if v != DEFAULT)]
    default_quantizer = quantization.ExpertQuantizer
    rows, scores = [], {}
    for variant in variants:
        path = work / f"{variant.replace(', ', '-').replace(' ', '-')}-{args.bits}.gguf"
        started = time.perf_counter()
        quantization.ExpertQuantizer = make_quantizer(variant, args.row_tokens)
        try:
            quantization.quantize(args.model, plan, path, stats=stats, tune=tune, progress=False)
        finally:
            quantization.ExpertQuantizer = default_quantizer
        seconds = time.perf_counter() - started
        row = {"variant": variant, "quantize_s": round(seconds, 1), "file_mb": path.stat().st_size / 1e6}
        for name, scored in texts.items():
            kld = scores[variant, name] = scored(path)
            row[f"{name}_kld"] = float(kld.mean())
            base = scores[DEFAULT, name]
            diff = kld / base.mean() - base / base.mean()     # the paired change, as a share of the default's
            row[f"{name}_change"] = float(diff.mean())
            row[f"{name}_change_se"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else None
        rows.append(row)
        print(" ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              file=sys.stderr, flush=True)
    emit_json({"model": args.model, "bits": args.bits, "row_descent_bytes_differing": same,
               "windows": args.windows, "ctx": args.ctx,
               "row_tokens": args.row_tokens, "texts": {k: str(v) for k, v in
                                                        (("eval", args.eval), ("eval2", args.eval2)) if v},
               "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
