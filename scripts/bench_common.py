"""What the benchmark scripts share: where the bench files are, the flags they all take, where their statistics come
from and how they report.

Each script builds its own parser and adds these flags where they belong among its own; a script whose flag
means something else (bench_scale.py's --ctx) keeps its own ``add_argument``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"
"""The bench model and its calibration and evaluation texts (../shared/bench/README.md)."""


def add_input_flags(parser: argparse.ArgumentParser, model_help: str = "Hugging Face model folder") -> None:
    """``--model``, ``--calib`` and ``--eval``, defaulting to the bench model and texts in BENCH."""
    parser.add_argument("--model", default=str(BENCH / "model"), help=model_help)
    parser.add_argument("--calib", default=str(BENCH / "calib.txt"), help="calibration text")
    parser.add_argument("--eval", default=str(BENCH / "eval.txt"), help="evaluation text")


def add_window_flags(parser: argparse.ArgumentParser, windows_help: str = "evaluation windows") -> None:
    """``--ctx`` and ``--windows``: how much of the evaluation text is scored, in windows of --ctx tokens.
    ``windows_help`` says what a script does with the windows; the default is appended to it."""
    parser.add_argument("--ctx", type=int, default=512, help="window length (default: 512)")
    parser.add_argument("--windows", type=int, default=16, help=f"{windows_help} (default: 16)")


def add_output_flags(parser: argparse.ArgumentParser, workdir: str | None = None,
                     workdir_help: str = "where the GGUF files go", quick_help: str | None = None) -> None:
    """``--workdir`` (when the script has a default folder), ``--quick`` (when ``quick_help`` says what the
    script's quick run is) and ``--json``, the file that emit_json writes."""
    if workdir is not None:
        parser.add_argument("--workdir", default=workdir, help=workdir_help)
    if quick_help is not None:
        parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", help="also write the JSON here")


def statistics(args: argparse.Namespace, work: Path, settings):
    """The statistics at ``--stats``, or kept in ``work``: calibrated there on ``--calib`` with ``settings`` (a
    CalibrationSettings) where the file is missing, so that the next run reuses them."""
    from mc_gguf.calibrate.calibration import calibrate
    from mc_gguf.calibrate.stats import load_stats
    from mc_gguf.calibrate.text import read_text

    path = Path(args.stats) if args.stats else work / "stats.safetensors"
    return load_stats(path) if path.exists() else calibrate(args.model, path, read_text(args.calib), settings,
                                                            progress=False)


def emit_json(report: dict, path: str | None, indent: int = 2) -> None:
    """Print the report as JSON, and write it to ``path`` too when one is given."""
    text = json.dumps(report, indent=indent)
    print(text)
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")
