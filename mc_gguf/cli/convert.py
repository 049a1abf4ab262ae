"""mc-gguf convert: a Hugging Face checkpoint to GGUF."""

from __future__ import annotations

import argparse
import time

from mc_gguf.cli.common import MODEL_HELP, add_command

EXAMPLE = "example: mc-gguf convert ./Mixtral-8x7B-v0.1 -o mixtral-f16.gguf --type f16"


def add_parser(commands) -> None:
    p = add_command(commands, "convert", "Convert a Hugging Face MoE checkpoint into a GGUF llama.cpp runs: Mixtral "
                    "by mc-gguf; Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, GLM4-MoE and gpt-oss by llama.cpp's own "
                    "convert_hf_to_gguf.py (from the pinned sdist).",
                    EXAMPLE)
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write (written atomically)")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="type of the weight matrices; norms and router stay F32 (default: f16)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from mc_gguf.gguf_io.convert import convert

    started = time.perf_counter()
    out = convert(args.model_dir, args.output, args.type, progress=not args.quiet)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.type}) in {time.perf_counter() - started:.1f} s")
