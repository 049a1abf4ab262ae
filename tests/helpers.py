"""Logits from both engines (and transformers' Fisher information), importable by tests, and runnable as a script
in a subprocess.

As a script it lets a test run llama_cpp on another library build
(LLAMA_CPP_LIB_PATH must be set before llama_cpp is imported) or with another
environment (LLAMA_MC_EXPERT_GROUPS_SPLIT is read once per process):

    python helpers.py MODEL.gguf IDS_JSON OUT.npy [LLAMA_KWARGS_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# Long enough to cross several rope periods; mixes words, digits, punctuation, unicode.
PROMPT = (
    "In 1879, the quick brown fox (aged 12) jumped over 3 lazy dogs; "
    "then it said: «Ça va?» and ran 42 km north-west, past the café."
)


# Loads a file once per set of load() keywords and reports where its weights went and its greedy text.
PLACEMENT_CLIENT = """
import json, sys
from mc_gguf.evaluate.run import complete
from mc_gguf.loader.model import load
path, prompt, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
results = []
for kwargs in runs:
    llm = load(path, n_ctx=128, use_mmap=False, **kwargs)
    results.append({"buffers": llm.model_buffers, "text": complete(llm, prompt, 12).text})
    llm.close()
print(json.dumps(results))
"""


def placements(path: Path, prompt: str, runs: list[dict], env: dict | None = None) -> list[dict]:
    """For each dict of ``runs`` (mc_gguf.load's placement keywords), the model buffers llama.cpp reported
    ({"CPU": MiB, "RPC0[...]": MiB, ...}) and 12 greedy tokens after ``prompt``: in a child process, so that
    devices registered by a run (RPC servers) and the runtime it loads (``env``'s PYTHONPATH) stay there.
    Weights are read into memory (no mmap), so that a CPU buffer's size is its tensors' bytes."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", PLACEMENT_CLIENT, str(path), prompt, json.dumps(runs)],
                            capture_output=True, text=True, timeout=600, check=False, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def transformers_logits(model, token_ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float().numpy()


def llama_cpp_logits(gguf_path: Path, token_ids: list[int], **kwargs) -> np.ndarray:
    """Next-token logits at every position from llama.cpp, with an F32 KV cache.

    The default F16 KV cache rounds K and V to 11 bits, which alone moves the
    logits by ~1e-3; an F32 cache leaves only float32 summation-order noise.
    """
    from llama_cpp import GGML_TYPE_F32, Llama

    settings = {"n_ctx": 512, "n_batch": 512, "logits_all": True, "verbose": False, "type_k": GGML_TYPE_F32,
                "type_v": GGML_TYPE_F32, "flash_attn": False, "seed": 0, **kwargs}
    if "mu" in settings or "protect_ratio" in settings:
        from mc_gguf.loader.model import load  # ODP settings: the patched runtime's loader

        llm = load(gguf_path, **settings)
    else:
        llm = Llama(model_path=str(gguf_path), **settings)
    llm.eval(token_ids)
    return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def transformers_fisher(model, folder, settings, text: str):
    """The Fisher information (calibrate/stats.Fisher) of ``model``, transformers' whole model, on the sequences a
    calibration with ``settings`` on ``text`` keeps: the log-probabilities of the tokens fisher.sample_labels draws
    from its logits summed, and autograd's gradients at the input of each layer's norm before its MoE block and at
    each layer's output (the next layer's input, the final norm's for the last), squared and averaged per token
    and dimension."""
    import torch
    from transformers import AutoTokenizer

    from mc_gguf.calibrate.fisher import sample_labels
    from mc_gguf.calibrate.stats import Fisher
    from mc_gguf.calibrate.text import pack_sequences
    from mc_gguf.hf.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    sequences = pack_sequences(ids, tokenizer.bos_token_id, settings.n_tokens, settings.seq_len, settings.seed)
    n_seq, length = sequences.shape
    kept = min(n_seq, -(-settings.fisher_tokens // length))
    layers = model.model.layers
    mid, out = np.zeros(len(layers)), np.zeros(len(layers))
    for i in range(kept):
        seen = {}
        hooks = [getattr(layer, ckpt.arch.moe_input_norm).register_forward_pre_hook(
                 lambda m, a, bid=bid: seen.__setitem__(("mid", bid), a[0])) for bid, layer in enumerate(layers)]
        hooks += [(layers[bid + 1].input_layernorm if bid + 1 < len(layers) else model.model.norm)
                  .register_forward_pre_hook(lambda m, a, bid=bid: seen.__setitem__(("out", bid), a[0]))
                  for bid in range(len(layers))]
        try:
            logits = model(torch.from_numpy(sequences[i:i + 1])).logits[0].float()
        finally:
            for hook in hooks:
                hook.remove()
        labels = sample_labels(logits, settings.seed + i)
        log_p = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
        points = sorted(seen)
        grads = torch.autograd.grad(log_p, [seen[p] for p in points])
        for (where, bid), grad in zip(points, grads):
            (mid if where == "mid" else out)[bid] += float((grad.double() ** 2).sum())
    scale = kept * length * model.config.hidden_size
    return Fisher(mid=mid / scale, out=out / scale)


def assert_same_fisher(got, expected) -> None:
    np.testing.assert_allclose(got.mid, expected.mid, rtol=1e-4)
    np.testing.assert_allclose(got.out, expected.out, rtol=1e-4)


if __name__ == "__main__":
    model, ids_json, out = sys.argv[1:4]
    kwargs = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    np.save(out, llama_cpp_logits(Path(model), json.loads(ids_json), **kwargs))
