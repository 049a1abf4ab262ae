"""Pieces several commands share: how a command is added, and flags with one meaning everywhere."""

from __future__ import annotations

import argparse
import sys


def add_command(parent, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description and, at the end, an example."""
    return parent.add_parser(name, help=help_text, description=help_text, epilog=example,
                             formatter_class=argparse.RawDescriptionHelpFormatter)


MAX_TYPES_HELP = ("at most N types (expert groups of the per-expert layout) in every layer and projection: "
                  "GPU backends run each group as ops of its own on every decoded token (the CPU runs them "
                  "in one), so fewer groups decode faster there, at some cost in quality (default: no bound)")


def add_cost_arguments(p: argparse.ArgumentParser, defaults: dict[str, float], gamma_note: str) -> None:
    """--alpha/--beta/--gamma, the exponents of the significance cost phi^alpha * w^beta * eps^gamma."""
    p.add_argument("--alpha", type=float, default=defaults["alpha"],
                   help=f"exponent of the activation frequency (default: {defaults['alpha']:g})")
    p.add_argument("--beta", type=float, default=defaults["beta"],
                   help=f"exponent of the routing weight (default: {defaults['beta']:g})")
    p.add_argument("--gamma", type=float, default=defaults["gamma"],
                   help=f"exponent of the quantization error (default: {defaults['gamma']:g}, {gamma_note})")


def add_generation_flags(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    """The model, length, sampling and pruning flags that run and chat share."""
    p.add_argument("model", help="GGUF file")
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature; 0 is greedy (default: {temperature})")
    p.add_argument("--no-odp", action="store_true", help="turn Online Dynamic Pruning off")
    p.add_argument("--mu", type=float, help="one pruning threshold for every layer, in [0, 1] "
                   "(default: the file's mc.odp.mu)")


def print_expert_stats(counts) -> None:
    total = sum(counts.computed) + sum(counts.skipped)
    if total:
        print(f"[expert slots: {sum(counts.computed)} computed, {sum(counts.skipped)} skipped "
              f"({100 * counts.skipped_share:.1f}%)]", file=sys.stderr)
