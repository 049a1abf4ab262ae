"""Every ``mc.*`` GGUF metadata key mc-gguf writes or reads, with its type and meaning: the one place.

Stock llama.cpp ignores these keys; the patched runtime reads the ones marked
``runtime`` (llama-model.cpp's load_hparams, patches 0006, 0007 and 0020). docs/FORMAT.md
explains the layout they describe; ``mc-gguf inspect`` prints each key with
the meaning given here, and a test checks that FORMAT.md lists every key.

This module imports nothing heavy: the CLI reads it to print help and inspect files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mc_gguf.errors import GGUFFileError

# Provenance, and what reads the file
VERSION = "mc.version"
RUNTIME_PATCH_LEVEL = "mc.runtime.patch_level"

# Per-expert quantization types (layout per-expert)
EXPERT_GROUPS = "mc.experts.groups"

# The plan and its provenance
PLAN_LAYOUT = "mc.plan.layout"
PLAN_TYPES = "mc.plan.types"
PLAN_BUDGET = "mc.plan.budget_bpw"
PLAN_SCOPE = "mc.plan.scope"
PLAN_EXPERT_BPW = "mc.plan.expert_bpw"
PLAN_MODEL_BPW = "mc.plan.model_bpw"
QUANTIZE_GPTQ = "mc.quantize.gptq"
QUANTIZE_TUNE_ITERS = "mc.quantize.tune_iters"
CALIBRATION_MODEL = "mc.calibration.model"
CALIBRATION_TEXT = "mc.calibration.text"
CALIBRATION_TEXT_SHA256 = "mc.calibration.text_sha256"
CALIBRATION_TOKENS = "mc.calibration.tokens"

# Online Dynamic Pruning
ODP_MU = "mc.odp.mu"
ODP_MU_ALL = "mc.odp.mu_all"
ODP_MU_EXPS = "mc.odp.mu_exps"
ODP_RENORMALIZE = "mc.odp.renormalize"
ODP_PROTECT_RATIO = "mc.odp.protect_ratio"
ODP_ENABLED = "mc.odp.enabled"


@dataclass(frozen=True)
class MetadataKey:
    """A key, its GGUF value type and what it means. ``value_type`` is gguf.GGUFValueType's name of the value,
    or of an array's items; ``length`` says how many items an array holds (None: a single value)."""

    name: str
    value_type: str    # "UINT32", "INT32", "FLOAT32", "BOOL" or "STRING" (gguf.h's enum gguf_type)
    meaning: str       # one line
    read_by: str       # "runtime": the patched llama.cpp reads it; "info": written for people and tools
    length: str | None = None  # an array's length in FORMAT.md's words ("block_count"); None: one value
    bulky: bool = False  # one value per expert projection: inspect shows it as the expert table, not as a list

    @property
    def gguf_type(self) -> str:
        """The type as docs/FORMAT.md's table writes it: ``float32``, ``array of float32``."""
        return ("array of " if self.length else "") + self.value_type.lower()

    def details(self, value: Any):
        """``value`` as gguf-py's MetadataDetails of this key's type: what GGUFWriter.add_key_value and
        gguf_io.edit.rewrite_metadata take. Items are converted (float(), int(), bool(), str())."""
        import gguf
        from gguf.scripts.gguf_new_metadata import MetadataDetails

        item_type = gguf.GGUFValueType[self.value_type]
        convert = _CONVERT[self.value_type]
        if self.length is None:
            return MetadataDetails(item_type, convert(value))
        return MetadataDetails(gguf.GGUFValueType.ARRAY, [convert(v) for v in value], sub_type=item_type)

    def write(self, writer, value: Any) -> None:
        """Add the key to a gguf.GGUFWriter with this key's type."""
        details = self.details(value)
        writer.add_key_value(self.name, details.value, details.type, sub_type=details.sub_type)

    def read(self, reader) -> Any:
        """The key's value in a gguf.GGUFReader (a list for an array), None when absent; a GGUFFileError names
        the type it should have when the file stores another."""
        field = reader.get_field(self.name)
        if field is None:
            return None
        expected = ([_ARRAY, self.value_type] if self.length is not None else [self.value_type])
        if [t.name for t in field.types] != expected:
            stored = " of ".join(t.name.lower() for t in field.types) or "nothing"
            raise GGUFFileError(f"{self.name} must be {self.describe_type()}, the file stores {stored}")
        return field.contents()

    def describe_type(self) -> str:
        return ("an " if self.length else "a ") + self.gguf_type


_ARRAY = "ARRAY"
_CONVERT: dict[str, Callable[[Any], Any]] = {"UINT32": int, "INT32": int, "FLOAT32": float, "BOOL": bool,
                                              "STRING": str}


def _key(name: str, value_type: str, meaning: str, read_by: str, length: str | None = None,
         bulky: bool = False) -> MetadataKey:
    if value_type not in _CONVERT:
        raise ValueError(f"{name}: {value_type} is not a type mc-gguf writes")
    return MetadataKey(name, value_type, meaning, read_by, length, bulky)


KEYS: tuple[MetadataKey, ...] = (
    _key(VERSION, "STRING", "the mc-gguf version that wrote the file", "info"),
    _key(RUNTIME_PATCH_LEVEL, "UINT32", "the lowest patch level of mc-gguf's runtime that reads all of the "
         "file (0: any llama.cpp loads it as it is); mc-gguf refuses an older runtime with it", "info"),
    _key(EXPERT_GROUPS, "INT32",
         "the group (tensor blk.N.ffn_{proj}_exps.g<G>) of expert e of projection p in layer l, "
         "at index (l*3 + p)*n_expert + e; 0 in a dense layer (no experts)", "runtime",
         length="n_layer * 3 * n_expert", bulky=True),
    _key(PLAN_LAYOUT, "STRING", "per-expert or stock", "info"),
    _key(PLAN_TYPES, "STRING",
         "the GGUF type of every expert projection, indexed as mc.experts.groups; empty in a dense layer",
         "info", length="n_layer * 3 * n_expert", bulky=True),
    _key(PLAN_BUDGET, "FLOAT32", "the bits-per-weight budget the plan was solved for", "info"),
    _key(PLAN_SCOPE, "STRING", "what the budget averages over: experts or model", "info"),
    _key(PLAN_EXPERT_BPW, "FLOAT32", "measured bits per weight of the expert tensors, scales included", "info"),
    _key(PLAN_MODEL_BPW, "FLOAT32", "measured bits per weight over every tensor of the file", "info"),
    _key(QUANTIZE_GPTQ, "BOOL", "whether GPTQ error compensation was used", "info"),
    _key(QUANTIZE_TUNE_ITERS, "UINT32", "the most coordinate-descent sweeps that tuned the K-quant experts' "
         "integers after GPTQ (0: not tuned)", "info"),
    _key(CALIBRATION_MODEL, "STRING", "the calibrated model's name", "info"),
    _key(CALIBRATION_TEXT, "STRING", "the calibration text (a path, or the built-in default)", "info"),
    _key(CALIBRATION_TEXT_SHA256, "STRING", "SHA-256 of the calibration text", "info"),
    _key(CALIBRATION_TOKENS, "UINT32", "calibration tokens", "info"),
    _key(ODP_MU, "FLOAT32",
         "pruning threshold per layer: slot i >= 1 is skipped when its weight is below mu times the "
         "token's top weight; 0 turns the layer's pruning off", "runtime", length="block_count"),
    _key(ODP_MU_EXPS, "FLOAT32",
         "pruning thresholds per layer and expert, row-major: in a layer whose mc.odp.mu is > 0, slot i >= 1 "
         "is skipped when its weight is below the threshold of its expert times the token's top weight",
         "runtime", length="block_count * expert_count"),
    _key(ODP_RENORMALIZE, "BOOL",
         "whether the weights a token keeps are renormalised after pruning, where the router renormalises "
         "(the paper's rule, and the default when the key is absent); false leaves them as they are",
         "runtime"),
    _key(ODP_PROTECT_RATIO, "FLOAT32",
         "share of a prompt's tokens (the most important) that keep all their experts; default 0.02",
         "runtime"),
    _key(ODP_MU_ALL, "FLOAT32", "one threshold for every layer (a load-time override)", "runtime"),
    _key(ODP_ENABLED, "BOOL", "false turns pruning off (a load-time override)", "runtime"),
)

BY_NAME: dict[str, MetadataKey] = {key.name: key for key in KEYS}


def meaning(name: str) -> str:
    """The key's one-line meaning, or a note that this mc-gguf does not know it."""
    key = BY_NAME.get(name)
    return key.meaning if key is not None else "not a key this mc-gguf knows (written by another version?)"


def details(name: str, value: Any):
    """``value`` typed as key ``name`` holds it (MetadataKey.details)."""
    return BY_NAME[name].details(value)


def write(writer, name: str, value: Any) -> None:
    """Add key ``name`` to a gguf.GGUFWriter with its type (MetadataKey.write)."""
    BY_NAME[name].write(writer, value)


def read(reader, name: str) -> Any:
    """Key ``name``'s value in a gguf.GGUFReader, checked against its type (MetadataKey.read)."""
    return BY_NAME[name].read(reader)
