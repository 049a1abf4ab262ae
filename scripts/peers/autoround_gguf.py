#!/usr/bin/env python3
"""AutoRound (intel/auto-round 0.16.1) as a peer: one Mixtral checkpoint to one GGUF, for bench_quality.py.

    python scripts/peers/autoround_gguf.py MODEL --calib TEXT --scheme gguf:q2_k_s --iters 100 -o OUT.gguf
        [--experts-only] [--avg-bits B --options GGUF:Q2_K_S,GGUF:Q3_K_S,GGUF:Q4_K_S]

Needs ``pip install -e .[peers]``. It runs AutoRound as its documentation does (``AutoRound(...)
.quantize_and_save(format="gguf:...")``, CPU, no torch.compile) on windows of the calibration text, with two
things Mixtral needs under transformers 5, found running it as a new user would:

- ``AR_DISABLE_META_LOAD=1``: AutoRound's meta-device loader looks for transformers 5's expert names in a
  checkpoint that has Mixtral's ``block_sparse_moe.experts.N.w1/w2/w3`` and leaves them on the meta device;
- its bundled llama.cpp converter is handed the experts fused again, as transformers 5 holds them
  (``mlp.experts.gate_up_proj`` [E, 2F, H] and ``mlp.experts.down_proj`` [E, H, F]), which the Llama
  converter's name map does not know; ``split_fused_experts`` gives it llama.cpp's three expert tensors,
  which AutoRound then packs expert by expert with its own tuned scales (moe_adapter.pack_moe_output).

``--experts-only`` keeps every other tensor at Q8_0 (bench_quality's expert frontier).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "AR_DISABLE_META_LOAD"):
    os.environ.setdefault(key, "1")

NON_EXPERT_Q8 = {"self_attn": "GGUF:Q8_0", "lm_head": "GGUF:Q8_0", "embed_tokens": "GGUF:Q8_0"}


def split_fused_experts() -> None:
    """Teach AutoRound's bundled Llama converter transformers 5's fused Mixtral experts (see the module doc)."""
    import gguf
    from auto_round.export.export_to_gguf import llama_cpp_conversion

    context = llama_cpp_conversion.ConversionContext
    if getattr(context, "_mc_gguf_split", False):
        return
    model_class = context.get_model_class

    def get_model_class(self, *args, **kwargs):
        cls = model_class(self, *args, **kwargs)
        for klass in cls.__mro__:
            if klass.__name__ == "LlamaModel" and not getattr(klass, "_mc_gguf_split", False):
                klass.modify_tensors = _splitting(klass.modify_tensors, gguf)
                klass._mc_gguf_split = True
        return cls

    context.get_model_class = get_model_class
    context._mc_gguf_split = True


def _splitting(modify_tensors, gguf):
    def modify(self, data, name: str, bid: int | None):
        if bid is not None and name.endswith("mlp.experts.gate_up_proj"):
            ff = data.shape[1] // 2  # gate's rows, then up's (MixtralExperts.forward chunks them so)
            yield self.format_tensor_name(gguf.MODEL_TENSOR.FFN_GATE_EXP, bid), data[:, :ff]
            yield self.format_tensor_name(gguf.MODEL_TENSOR.FFN_UP_EXP, bid), data[:, ff:]
        elif bid is not None and name.endswith("mlp.experts.down_proj"):
            yield self.format_tensor_name(gguf.MODEL_TENSOR.FFN_DOWN_EXP, bid), data
        else:
            yield from modify_tensors(self, data, name, bid)
    return modify


def calibration_file(model: str, text: str, seqlen: int, folder: Path) -> Path:
    """The text as AutoRound's local-file loader reads it: JSON lines of ``{"text": ...}``, each a window of
    the model's tokens a little longer than ``seqlen`` (AutoRound drops samples shorter than it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    width = seqlen + seqlen // 16
    path = folder / "calib.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for first in range(0, len(ids) - width + 1, width):
            f.write(json.dumps({"text": tokenizer.decode(ids[first:first + width])}) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Hugging Face model folder (Mixtral)")
    parser.add_argument("--calib", required=True, help="calibration text file")
    parser.add_argument("--scheme", default="gguf:q2_k_s", help="AutoRound's GGUF scheme (default: gguf:q2_k_s)")
    parser.add_argument("--iters", type=int, default=100, help="SignRound iterations (0: its opt-RTN)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--experts-only", action="store_true", help="every non-expert tensor Q8_0")
    parser.add_argument("--avg-bits", type=float, help="AutoScheme's average bits over --options")
    parser.add_argument("--options", help="AutoScheme's candidate schemes, comma separated")
    parser.add_argument("-o", "--output", required=True, help="the GGUF to write")
    args = parser.parse_args()

    from auto_round import AutoRound, AutoScheme

    split_fused_experts()
    scheme = args.scheme
    if args.options:
        scheme = AutoScheme(avg_bits=args.avg_bits, options=tuple(args.options.split(",")), ignore_scale_zp_bits=True)
    out = Path(args.output)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        dataset = calibration_file(args.model, Path(args.calib).read_text(encoding="utf-8"), args.seqlen, Path(tmp))
        rounder = AutoRound(model=args.model, scheme=scheme, dataset=str(dataset), nsamples=args.nsamples,
                            seqlen=args.seqlen, batch_size=args.batch_size, iters=args.iters, device_map="cpu",
                            enable_torch_compile=False,
                            layer_config=dict(NON_EXPERT_Q8) if args.experts_only else None)
        rounder.quantize_and_save(output_dir=str(Path(tmp) / "out"), format=args.scheme)
        written = sorted((Path(tmp) / "out").rglob("*.gguf"))
        if len(written) != 1:
            raise SystemExit(f"AutoRound wrote {len(written)} GGUF files: {written}")
        os.replace(written[0], out)
    print(json.dumps({"output": str(out), "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
