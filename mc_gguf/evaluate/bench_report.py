"""What ``bench`` reports and how it is written: llama-bench's result fields (its ``struct test``,
tools/llama-bench/llama-bench.cpp) with the expert slots and pruning's bytes per token beside them, and
llama-bench's printers: the markdown table (``markdown_printer``, with the pruning columns and a line per
pruned tg test), JSON, JSON lines and CSV (``json_printer``, ``jsonl_printer``, ``csv_printer``: one row per
test, the model's fields repeated in each).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from typing import TextIO

from mc_gguf.errors import InvalidValueError


@dataclass(frozen=True)
class BenchResult:
    """One test under one pruning setting: llama-bench's JSON fields, and the expert slots."""

    test: str                  # "pp512", "tg128"
    n_prompt: int
    n_gen: int
    odp: bool
    samples_ns: list[int]
    samples_ts: list[float]
    avg_ts: float
    stddev_ts: float
    avg_ns: int
    stddev_ns: int
    slots_computed: int
    slots_skipped: int
    skipped_share: float | None  # of the expert slots the runs met (None: the file has no MoE layers)
    bytes_per_token: float | None = None      # tg: bytes a generated token reads with this setting
    ceiling_speedup: float | None = None      # tg with pruning: unpruned bytes / pruned bytes
    speedup: float | None = None              # tg with pruning: avg_ts / the unpruned test's avg_ts


@dataclass(frozen=True)
class BenchReport:
    model_filename: str
    model_type: str
    model_size: int        # bytes of the tensors
    model_n_params: int
    backends: str          # where the weights were placed ("CPU", "CPU,CUDA", "CPU,RPC")
    n_threads: int
    n_threads_batch: int
    n_gpu_layers: int
    n_batch: int
    n_ubatch: int
    mu: float | None
    results: list[BenchResult]

    def rows(self) -> list[dict]:
        """llama-bench's JSON: one object per test, the model's fields repeated in each."""
        model = {k: v for k, v in asdict(self).items() if k != "results"}
        return [{**model, **asdict(r)} for r in self.results]



def describe(report: BenchReport) -> str:
    """llama-bench's markdown table, with the pruning columns, then a line per pruned tg test."""
    size = f"{report.model_size / 2**30:.2f} GiB" if report.model_size >= 2**30 else \
        f"{report.model_size / 2**20:.2f} MiB"
    params = _si(report.model_n_params)
    header = ["model", "size", "params", "backend", "threads", "odp", "test", "t/s", "skipped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 5 + [":-:", "---:", "---:", "---:"]) + "|"]
    for r in report.results:
        skipped = "-" if r.skipped_share is None else f"{100 * r.skipped_share:.1f}%"
        lines.append(f"| {report.model_type} | {size} | {params} | {report.backends} | {report.n_threads} | "
                     f"{'on' if r.odp else 'off'} | {r.test} | {r.avg_ts:.2f} ± {r.stddev_ts:.2f} | {skipped} |")
    for r in report.results:
        if r.ceiling_speedup is not None:
            lines.append(f"\n{r.test} with pruning: {100 * r.skipped_share:.1f}% of the expert slots skipped, a token "
                         f"reads {_si(r.bytes_per_token, 'B')} instead of "
                         f"{_si(r.bytes_per_token * r.ceiling_speedup, 'B')}: at most {r.ceiling_speedup:.2f}x "
                         f"where memory bandwidth bounds generation; measured {r.speedup:.2f}x")
    return "\n".join(lines)


def write_rows(report: BenchReport, output: str, stream: TextIO) -> None:
    """llama-bench's machine-readable outputs: ``json`` (a list), ``jsonl`` (an object a line) or ``csv``."""
    rows = report.rows()
    if output == "json":
        stream.write(json.dumps(rows, indent=2) + "\n")
    elif output == "jsonl":
        stream.writelines(json.dumps(row) + "\n" for row in rows)
    elif output == "csv":
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
    else:
        raise InvalidValueError(f"unknown output format {output!r}")


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.2f} {prefix}{unit}".rstrip()
    return f"{value:g} {unit}".rstrip() if not math.isnan(value) else "-"
