"""llama.cpp's own converter, for the families whose table row names it (hf/architectures.py).

convert_hf_to_gguf.py from the pinned sdist knows each family's metadata
keys, tensor renames and tokenizer; it runs in a child process with the
sdist's own gguf-py, so nothing of it is copied here. Two uses:

- ``llama_cpp_convert``: the whole model, as a llama.cpp user converts it
  (``mc-gguf convert`` for these families);
- ``base_without_experts``: the same conversion with the routed experts
  filtered out before the converter reads them (its ``filter_tensors``
  hook), at the checkpoint's own precision. quantize takes the metadata and
  every other tensor from this file and writes the experts itself, one at a
  time from the checkpoint, as the plan says. It is small (no experts) and
  kept in the cache (``~/.cache/mc-gguf/base``), keyed by the model folder's
  files, so calibrate, allocate and quantize share one.

A folder with a SentencePiece ``tokenizer.model`` is read with the
converter's SentencePiece reader (as its LlamaModel does first); otherwise
the family's own ``set_vocab`` decides (BPE with its pre-tokenizer, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from mc_gguf.atomic import atomic_output, check_output_path
from mc_gguf.errors import CheckpointError
from mc_gguf.hf.checkpoint import Checkpoint
from mc_gguf.hf.hub import named_folder

# The converter's --outtype for the checkpoint's own dtype: the base holds the weights exactly.
BASE_OUTTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}

CHILD = """
import re, sys
source, architecture, drop, sentencepiece = sys.argv[1:5]
sys.path.insert(0, source)
import convert_hf_to_gguf
from conversion import get_model_class
cls = get_model_class(architecture)
if sentencepiece == "1":
    cls.set_vocab = lambda self: self._set_vocab_sentencepiece()
if drop:
    dropped = re.compile(drop)
    keep = cls.filter_tensors
    cls.filter_tensors = classmethod(lambda klass, item: None if dropped.match(item[0]) else keep(item))
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[5:]]
convert_hf_to_gguf.main()
"""


def run_converter(model_dir: Path, out: Path, architecture: str, outtype: str, drop: str = "") -> Path:
    """Run the converter's class for ``architecture`` on ``model_dir`` into ``out`` (written atomically),
    leaving out the checkpoint tensors whose names match the regular expression ``drop``."""
    from mc_gguf.runtime.source import patched_source

    source = patched_source()  # the sdist's tree: the patch series touches no Python file
    sentencepiece = "1" if (model_dir / "tokenizer.model").is_file() else "0"
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}  # the sdist's gguf-py
    with atomic_output(out) as tmp, named_folder(model_dir) as named:  # named as the model, not a commit hash
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(source), architecture, drop, sentencepiece,
             str(named), "--outtype", outtype, "--outfile", str(tmp)],
            capture_output=True, text=True, env=env)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-8:])
            raise CheckpointError(f"{model_dir}: llama.cpp's convert_hf_to_gguf.py failed "
                                  f"(exit {result.returncode}):\n{tail}")
    return out


def llama_cpp_convert(ckpt: Checkpoint, out: str | Path, out_type: str) -> Path:
    """The whole checkpoint as llama.cpp's converter writes it (``out_type``: f32, f16, bf16 or q8_0)."""
    return run_converter(ckpt.path, check_output_path(out), ckpt.arch.hf_architecture, out_type)


def base_without_experts(ckpt: Checkpoint) -> Path:
    """The converter's file without the routed experts, from the cache or made now."""
    from mc_gguf.runtime.source import cache_root

    path = cache_root() / "base" / f"{_base_key(ckpt)}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = ckpt.path.resolve()
        _forget_stale(path.parent, model)
        path.with_suffix(".json").write_text(json.dumps({"model": str(model)}))
        print(f"converting {ckpt.path.name}'s metadata and non-expert tensors with llama.cpp's "
              "convert_hf_to_gguf.py", file=sys.stderr, flush=True)
        run_converter(ckpt.path, path, ckpt.arch.hf_architecture, _base_outtype(ckpt), drop=ckpt.arch.expert_pattern())
    return path


def _forget_stale(folder: Path, changed: Path) -> None:
    """Remove the cached files of model folders that no longer exist or (``changed``) are converted anew;
    each file has a .json beside it naming its folder."""
    for note in folder.glob("*.json"):
        try:
            model = Path(json.loads(note.read_text())["model"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if model == changed or not model.is_dir():
            note.with_suffix(".gguf").unlink(missing_ok=True)
            note.unlink(missing_ok=True)


def _base_outtype(ckpt: Checkpoint) -> str:
    """The checkpoint's dtype of its non-expert weights (f32 where it is none of F32, F16, BF16)."""
    dtype = ckpt.tensors[ckpt.arch.embed_tokens].dtype if ckpt.arch.embed_tokens in ckpt.tensors else "F32"
    return BASE_OUTTYPE.get(dtype, "f32")


def _base_key(ckpt: Checkpoint) -> str:
    """Changes when any file of the model folder or the converter's sdist changes."""
    from mc_gguf.runtime.source import SDIST_VERSION

    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt.path.iterdir() if p.is_file())
    text = json.dumps([str(ckpt.path.resolve()), SDIST_VERSION, files])
    return hashlib.sha256(text.encode()).hexdigest()[:24]
