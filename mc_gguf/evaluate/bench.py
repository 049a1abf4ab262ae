"""Prompt and generation speed of a GGUF on the patched runtime, as llama-bench measures it, with and without ODP.

llama-bench (llama.cpp's tools/llama-bench/llama-bench.cpp) runs each test on an
empty context, on seeded random tokens:

- ``ppN`` (``test_prompt``): N tokens, the first the vocabulary's BOS when it
  adds one, decoded in batches of ``n_batch``;
- ``tgN`` (``test_gen``): N tokens decoded one at a time;

one warm-up run per test first, then ``repetitions`` timed runs; a run's speed
is its tokens over its wall time, and the test reports their mean and
standard deviation (``avg_ts``, ``stddev_ts``). ``bench`` does the same through
the library ``run.load`` loads, once per pruning setting, and adds what
pruning changes: the share of expert slots the runtime's counters saw skipped,
and the bytes a generated token reads (``token_bytes``: every matrix but the
embedding table, and per layer the chosen experts' mean size; a skipped slot
reads its expert's mean output instead, one row of ``blk.N.ffn_odp_mean``) unpruned and
with that share skipped. Their ratio is the most skipping can speed up a
generation bound by memory bandwidth (``ceiling_speedup``); the measured ratio
of the pruned and unpruned tg speeds sits beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mc_gguf.errors import InvalidValueError
from mc_gguf.evaluate.bench_report import BenchReport, BenchResult

EMBEDDING = "token_embd.weight"  # read one row per token: not a matrix a token streams through
EXPERT_MARK = "_exps"            # ffn_{gate,up,down,gate_up}_exps and their per-expert groups (.gK)


@dataclass(frozen=True)
class BenchSettings:
    """llama-bench's test matrix (-p, -n, -r, -b, -ub) and the pruning settings to run it under."""

    n_prompt: tuple[int, ...] = (512,)  # -p: a ppN test for each (0: none)
    n_gen: tuple[int, ...] = (128,)     # -n: a tgN test for each (0: none)
    repetitions: int = 5                # -r
    n_batch: int = 2048                 # -b: tokens per llama_decode call of a prompt (llama-bench's default)
    n_ubatch: int = 512                 # -ub: tokens per compute graph
    odp: tuple[bool, ...] | None = None  # pruning off/on; None: both when the file or mu gives thresholds
    mu: float | None = None             # one threshold for every layer instead of the file's
    seed: int = 0                       # the random tokens' (llama-bench: std::rand, unseeded)
    warmup: bool = True                 # one untimed run of each test first (llama-bench's --no-warmup: False)
    n_ctx: int | None = None            # the context; None: the largest test's tokens (llama-bench's)
    # where the model runs, run.load's keywords (llama.cpp's -t, -tb, -ngl, --cpu-moe, -ot, --rpc, --no-repack)
    load_options: dict = field(default_factory=dict)

    def tests(self) -> list[tuple[str, int]]:
        return [("pp", n) for n in self.n_prompt if n > 0] + [("tg", n) for n in self.n_gen if n > 0]

    def check(self) -> None:
        if not self.tests():
            raise InvalidValueError("no test to run: give -p or -n a count above 0")
        if any(n < 0 for n in (*self.n_prompt, *self.n_gen)):
            raise InvalidValueError("-p and -n take token counts of 0 or more")
        if self.repetitions < 1 or self.n_batch < 1 or self.n_ubatch < 1:
            raise InvalidValueError("-r, -b and -ub take counts of 1 or more")
        if self.n_ctx is not None and self.n_ctx < self.context_needed():
            raise InvalidValueError(f"a context of {self.n_ctx} tokens cannot hold the largest test's "
                                    f"{self.context_needed()} tokens: leave -c out or give at least that")

    @property
    def ubatch(self) -> int:
        """Tokens per compute graph: -ub, at most -b (llama.cpp clamps it so)."""
        return min(self.n_ubatch, self.n_batch)

    def context_needed(self) -> int:
        return max(n for _, n in self.tests())


@dataclass(frozen=True)
class TokenBytes:
    """What a generated token reads from a file's weights, from its tensor table."""

    dense: int                 # every matrix but the embedding table, the experts and pruning's mean outputs
    expert_mean: list[float]   # per layer, the mean bytes of one expert (its gate, up and down)
    n_used: list[int]          # per layer, the experts a token uses
    mean_row: list[float]      # per layer, the bytes of one expert's mean output, which a skipped slot reads

    def per_token(self, skipped_share: list[float] | None = None) -> float:
        """Bytes a token reads, with ``skipped_share`` of each layer's expert slots skipped (None: none): a
        skipped slot reads its expert's mean output (one row of blk.N.ffn_odp_mean) instead of the expert."""
        kept = skipped_share or [0.0] * len(self.n_used)
        return self.dense + sum(n * ((1 - s) * b + s * r)
                                for n, s, b, r in zip(self.n_used, kept, self.expert_mean, self.mean_row))


def token_bytes(path: str | Path, reader=None) -> TokenBytes:
    """The bytes a token reads from ``path``'s weights (TokenBytes), from gguf-py's tensor table (``reader``'s,
    when the caller has the file open)."""
    from mc_gguf.gguf_io.edit import field_value, open_gguf
    from mc_gguf.gguf_io.requirements import ODP_MEAN_TENSOR

    reader = reader if reader is not None else open_gguf(path)
    arch = field_value(reader, "general.architecture")
    n_layers = int(field_value(reader, f"{arch}.block_count") or 0)

    def per_layer(key: str) -> list[int]:
        value = field_value(reader, f"{arch}.{key}")
        values = list(value) if isinstance(value, (list, tuple)) else [value or 0] * n_layers
        return [int(v) for v in values]

    n_expert, n_used = per_layer("expert_count"), per_layer("expert_used_count")
    dense, experts, means = 0, [0] * n_layers, [0] * n_layers
    for tensor in reader.tensors:
        if EXPERT_MARK in tensor.name and tensor.name.startswith("blk."):
            experts[int(tensor.name.split(".")[1])] += int(tensor.n_bytes)
        elif ODP_MEAN_TENSOR.match(tensor.name):
            means[int(tensor.name.split(".")[1])] += int(tensor.n_bytes)
        elif tensor.name != EMBEDDING:
            dense += int(tensor.n_bytes)

    def per_expert(total: list[int]) -> list[float]:
        return [b / n if n else 0.0 for b, n in zip(total, n_expert)]

    return TokenBytes(dense, per_expert(experts), [u if b else 0 for u, b in zip(n_used, experts)], per_expert(means))


def bench(path: str | Path, settings: BenchSettings = BenchSettings(),
          progress: Callable[[str], None] | None = None) -> BenchReport:
    """llama-bench's tests on ``path`` (the module docstring), once per pruning setting."""
    from mc_gguf.gguf_io.edit import open_gguf
    from mc_gguf.loader.model import load, read_odp_metadata

    settings.check()
    path = Path(path)
    reader = open_gguf(path)
    odp_settings = settings.odp
    if odp_settings is None:
        prunes = settings.mu is not None or read_odp_metadata(path, reader) is not None
        odp_settings = (False, True) if prunes else (False,)
    need = token_bytes(path, reader)
    del reader  # the map released before llama.cpp maps the file
    tests = settings.tests()
    n_ctx = settings.n_ctx or settings.context_needed()
    results: list[BenchResult] = []
    model_info = None
    for odp in odp_settings:
        llm = load(path, odp=odp, mu=settings.mu if odp else None, n_ctx=n_ctx, n_batch=settings.n_batch,
                   n_ubatch=settings.ubatch, **settings.load_options)
        try:
            if model_info is None:
                model_info = _model_info(llm, path)
            for kind, n in tests:
                if progress:
                    progress(f"{kind}{n}, pruning {'on' if odp else 'off'}")
                results.append(_run_test(llm, kind, n, odp, settings, need))
        finally:
            llm.close()
    results = _with_speedups(results)
    return BenchReport(**model_info, n_batch=settings.n_batch, n_ubatch=settings.ubatch,
                       mu=settings.mu, results=results)


def _tokens(llm, n: int, rng) -> list[int]:
    """llama-bench's tokens: random ids, the first BOS when the vocabulary adds one."""
    tokens = [int(t) for t in rng.integers(0, llm.n_vocab(), n)]
    if tokens and llm._model.add_bos_token() and llm.token_bos() >= 0:
        tokens[0] = llm.token_bos()
    return tokens


def _decode(llm, tokens: list[int], one_at_a_time: bool) -> int:
    """Wall time in ns of decoding ``tokens`` on an empty context (a prompt in n_batch batches, or one by one)."""
    llm.reset()
    llm._ctx.kv_cache_clear()  # llama_memory_clear, as llama-bench before each run
    started = time.perf_counter_ns()
    if one_at_a_time:
        for token in tokens:
            llm.eval([token])
    else:
        llm.eval(tokens)
    return time.perf_counter_ns() - started


def _run_test(llm, kind: str, n: int, odp: bool, settings: BenchSettings, need: TokenBytes) -> BenchResult:
    import numpy as np

    rng = np.random.default_rng(settings.seed)
    one_at_a_time = kind == "tg"
    if settings.warmup:  # llama-bench's: one prompt batch, or one token
        _decode(llm, _tokens(llm, 1 if one_at_a_time else min(n, settings.n_batch), rng), one_at_a_time)
    llm.reset_expert_stats()
    samples = [_decode(llm, _tokens(llm, n, rng), one_at_a_time) for _ in range(settings.repetitions)]
    counts = llm.expert_stats()
    computed, skipped = sum(counts.computed), sum(counts.skipped)
    rates = [n * 1e9 / ns for ns in samples]
    shares = [s / (c + s) if c + s else 0.0 for c, s in zip(counts.computed, counts.skipped)]
    has_experts = any(need.n_used)
    return BenchResult(
        test=f"{kind}{n}", n_prompt=n if kind == "pp" else 0, n_gen=n if kind == "tg" else 0, odp=odp,
        samples_ns=samples, samples_ts=[round(r, 3) for r in rates], avg_ts=statistics.fmean(rates),
        stddev_ts=statistics.stdev(rates) if len(rates) > 1 else 0.0, avg_ns=int(statistics.fmean(samples)),
        stddev_ns=int(statistics.stdev(samples)) if len(samples) > 1 else 0,
        slots_computed=computed, slots_skipped=skipped,
        skipped_share=skipped / (computed + skipped) if computed + skipped else (None if not has_experts else 0.0),
        bytes_per_token=need.per_token(_layer_shares(shares, need)) if kind == "tg" else None)


def _layer_shares(shares: list[float], need: TokenBytes) -> list[float]:
    """The counters' per-layer skipped shares, one per layer of the file (layers without experts: 0)."""
    return [shares[i] if i < len(shares) else 0.0 for i in range(len(need.n_used))]


def _with_speedups(results: list[BenchResult]) -> list[BenchResult]:
    """Each pruned tg test with its unpruned twin's bytes and speed: the bandwidth ceiling and the speed-up."""
    plain = {r.test: r for r in results if not r.odp}
    out = []
    for r in results:
        base = plain.get(r.test)
        if r.odp and r.n_gen and base is not None and r.bytes_per_token:
            r = replace(r, ceiling_speedup=base.bytes_per_token / r.bytes_per_token,
                        speedup=r.avg_ts / base.avg_ts if base.avg_ts else None)
        out.append(r)
    return out


def _model_info(llm, path: Path) -> dict:
    """llama-bench's model fields (model_type as llama_model_desc writes it) and where the weights went."""
    import llama_cpp

    buf = (llama_cpp.ctypes.c_char * 256)()
    llama_cpp.llama_model_desc(llm.model, buf, len(buf))
    places = sorted({_backend_name(name) for name in getattr(llm, "model_buffers", {})}) or ["CPU"]
    params = llm.context_params
    return dict(model_filename=str(path), model_type=buf.value.decode(errors="replace"),
                model_size=int(llama_cpp.llama_model_size(llm.model)),
                model_n_params=int(llama_cpp.llama_model_n_params(llm.model)), backends=",".join(places),
                n_threads=int(params.n_threads), n_threads_batch=int(params.n_threads_batch),
                n_gpu_layers=_layers_given(int(llm.model_params.n_gpu_layers)))


def _layers_given(n_gpu_layers: int) -> int:
    """-ngl as given: llama-cpp-python passes -1 (all) to llama.cpp as INT32_MAX."""
    return -1 if n_gpu_layers >= 2**31 - 1 else n_gpu_layers


def _backend_name(buffer: str) -> str:
    """A model buffer's backend: "CPU_Mapped" and "CPU_REPACK" -> CPU, "CUDA0" -> CUDA, "RPC0[host:port]" -> RPC."""
    name = buffer.split("[")[0].split("_")[0]
    return name.rstrip("0123456789") or name
