"""Which programs can load a file: any llama.cpp, or only mc-gguf's patched runtime from some patch level on.

A file whose experts of one layer and projection have different types holds
them as groups (``blk.N.ffn_{proj}_exps.gK.weight``, layout.py): stock
llama.cpp, and the programs built on it (ollama, LM Studio, llama-server),
refuse it ("missing tensor 'blk.0.ffn_down_exps.weight'"). Every other file
mc-gguf writes is a normal GGUF; the ``mc.odp.*`` keys are ignored there and
read by the patched runtime, which then prunes.

The patch level of each feature is the LLAMA_MC_PATCH_LEVEL at which the
series brought it (llama.h defines the level once; the series raises it when
what files or bindings can rely on changes): expert groups and pruning reach
each family at the level of FAMILY_LEVEL; per-expert thresholds and the
renormalization choice at 12; pruning's mean outputs (``blk.N.ffn_odp_mean``,
which stock llama.cpp counts as a tensor too many, so only files it refuses
anyway carry them) at 15. The file carries the level it needs
(``mc.runtime.patch_level``), and ``loader.model.load`` refuses an older
runtime with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mc_gguf.gguf_io import keys

# the patch level (LLAMA_MC_PATCH_LEVEL) from which the runtime's graph of each family (general.architecture)
# reads expert groups and mc.odp.mu, as the series reached them: a file records the lowest level that reads it,
# so files of these families load in every runtime since (the current series, patch level 15, has them all)
FAMILY_LEVEL = {"llama": 4, "qwen2moe": 6, "qwen3moe": 6, "olmoe": 6, "deepseek2": 8, "glm4moe": 9, "gpt-oss": 10}
PER_EXPERT_ODP_LEVEL = 12  # mc.odp.mu_exps and mc.odp.renormalize (patch 0009)
ODP_MEAN_LEVEL = 15  # blk.N.ffn_odp_mean (patch 0011)
GROUP_TENSOR = re.compile(r"\.ffn_(gate|up|down)_exps\.g\d+\.weight$")
ODP_MEAN_TENSOR = re.compile(r"^blk\.\d+\.ffn_odp_mean\.weight$")


@dataclass(frozen=True)
class Requirements:
    """What a file needs to load, and what it needs to prune."""

    patch_level: int      # the lowest patch level of mc-gguf's runtime that reads all of it (0: nothing of it)
    stock_loads: bool     # does an unpatched llama.cpp load it (without pruning)?
    prunes: bool          # does it carry pruning thresholds?

    def describe(self) -> str:
        """One line for a person: where the file runs."""
        if self.stock_loads:
            where = "any llama.cpp loads it (llama-cli, llama-server, ollama, LM Studio)"
            if self.prunes:
                where += (f"; mc-gguf's runtime (patch level {self.patch_level} or later: run, chat, eval, serve) "
                          "also prunes experts as its mc.odp.* keys say")
            return "runs in: " + where
        return (f"runs in: mc-gguf's runtime only (patch level {self.patch_level} or later: mc-gguf run, chat, eval, "
                "serve, or llama-cpp-python from `mc-gguf runtime build`); stock llama.cpp, ollama and LM Studio "
                "refuse it (its experts have types of their own: per-expert layout); `--layout stock` writes a file "
                "every llama.cpp loads")


def requirements(arch: str, tensor_names: Iterable[str], fields: Mapping[str, object]) -> Requirements:
    """The requirements of a file of ``arch`` holding ``tensor_names`` and the metadata keys of ``fields``."""
    family = FAMILY_LEVEL.get(arch, max(FAMILY_LEVEL.values()))
    names = list(tensor_names)
    groups = any(GROUP_TENSOR.search(name) for name in names)
    means = any(ODP_MEAN_TENSOR.search(name) for name in names)
    prunes = keys.ODP_MU in fields
    level = family if groups or prunes else 0
    if prunes and (keys.ODP_MU_EXPS in fields or keys.ODP_RENORMALIZE in fields):
        level = max(level, PER_EXPERT_ODP_LEVEL)
    if means:
        level = max(level, ODP_MEAN_LEVEL)
    return Requirements(level, stock_loads=not (groups or means), prunes=prunes)


def file_requirements(header) -> Requirements:
    """The requirements of a scanned file (header.GGUFHeader)."""
    return requirements(header.architecture or "", (t.name for t in header.tensors), header.fields)


def needed_patch_level(header) -> int:
    """The patch level a scanned file says it needs (mc.runtime.patch_level), else the one its content needs
    (files written before the key)."""
    stored = header.get(keys.RUNTIME_PATCH_LEVEL)
    if isinstance(stored, int) and not isinstance(stored, bool):
        return stored
    return file_requirements(header).patch_level


def runs_in(path) -> str:
    """``Requirements.describe`` of the file at ``path``."""
    from mc_gguf.gguf_io.header import scan

    return file_requirements(scan(path)).describe()
