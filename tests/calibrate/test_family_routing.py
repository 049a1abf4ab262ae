"""Calibration of the other families (Qwen2/3-MoE, OLMoE, DeepSeek-V2, GLM4-MoE, gpt-oss) routes every token as
transformers' own router does, and its MoE block computes transformers' output.

The streamed calibration (decoder layers one at a time, mc-gguf's MoE block
inside) runs on a tiny seeded checkpoint of each family; the reference is the
whole transformers model on the same sequences, its routers' outputs read by
hooks: experts chosen, weights applied (renormalised or not, as the config
says, and scaled by the routed_scaling_factor of DeepSeek and GLM), and
router probabilities (softmax; GLM4-MoE's sigmoid, its slots chosen with a
selection bias and within groups of experts; gpt-oss's router bias and
softmax over the chosen logits). The first layer of DeepSeek-V2 and GLM4-MoE
is dense: it has no router and no statistics. The experts as calibration
reads and runs them (gpt-oss: stacked, gate and up interleaved, biases, its
own activation) give the output of transformers' MoE block.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from mc_gguf.calibrate.calibration import calibrate
from mc_gguf.calibrate.forward import load_experts
from mc_gguf.calibrate.moe import RoutingRule, StatisticsMoE
from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.calibrate.text import CalibrationText, pack_sequences
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.hf.tiny import build_tiny_family

from conftest import CALIBRATION_TEXT

SETTINGS = CalibrationSettings(n_tokens=512, seq_len=128, seed=3, types=(), fisher_tokens=256)  # 2 of 4 sequences


@pytest.fixture(scope="module", params=["qwen2moe", "qwen3moe", "olmoe", "deepseek2", "glm4moe", "gptoss"])
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_family(request.param, tmp_path_factory.mktemp(request.param) / "model")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(CALIBRATION_TEXT, add_special_tokens=False).input_ids
    sequences = pack_sequences(ids, tokenizer.bos_token_id, SETTINGS.n_tokens, SETTINGS.seq_len, SETTINGS.seed)
    ckpt = open_checkpoint(folder)
    routers = []  # per MoE layer: (router input, logits, applied weights, experts), slots by descending weight
    hooks = [getattr(model.model.layers[bid].mlp, ckpt.arch.hf_router).register_forward_hook(
             lambda m, i, o: routers.append((i[0], *by_weight(*o)))) for bid in ckpt.moe_layers]
    try:
        with torch.no_grad():
            model(torch.from_numpy(sequences))
    finally:
        for hook in hooks:
            hook.remove()
    stats = calibrate(folder, tmp_path_factory.mktemp("stats") / "stats", CalibrationText("test", CALIBRATION_TEXT),
                      SETTINGS, progress=False)
    return folder, model, routers, stats


def by_weight(logits, applied, experts):
    """A router's outputs with each token's slots in descending weight (DeepSeek's top-k is unsorted)."""
    order = torch.argsort(applied, dim=-1, descending=True)
    return logits, applied.gather(1, order), experts.gather(1, order)


def test_counts_weights_and_ratios_equal_transformers_routers(family):
    folder, model, routers, stats = family
    assert [bid for bid, _ in stats.moe_layers] == open_checkpoint(folder).moe_layers
    assert len(routers) == len(stats.moe_layers) and len(stats.layers) == model.config.num_hidden_layers
    sigmoid = open_checkpoint(folder).arch.gating == gguf.ExpertGatingFuncType.SIGMOID
    for (_, layer), (_, logits, _, experts) in zip(stats.moe_layers, routers):
        probs = torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), dim=-1)
        np.testing.assert_array_equal(layer.count, np.bincount(experts.reshape(-1).numpy(), minlength=probs.shape[1]))
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, experts, True)
        np.testing.assert_allclose(layer.weight_sum, (probs * chosen).sum(0).double().numpy(), rtol=1e-4)
        top = probs.gather(1, experts)
        np.testing.assert_allclose(layer.top_ratio[:, 0], (top[:, 1] / top[:, 0]).numpy(), rtol=1e-4)


def test_the_weights_applied_to_the_experts_are_transformers_own(family):
    """Renormalised to sum to 1 for Qwen3-MoE (norm_topk_prob true), the raw probabilities for OLMoE, those
    times routed_scaling_factor for DeepSeek-V2."""
    folder, model, routers, _ = family
    ckpt = open_checkpoint(folder)
    assert ckpt.norm_topk_prob == getattr(model.config, "norm_topk_prob", True)  # gpt-oss: a softmax over the top-k
    assert ckpt.routed_scale == getattr(model.config, "routed_scaling_factor", 1.0)
    for bid, (x, _, applied, experts) in zip(ckpt.moe_layers, routers):
        routing = block(ckpt, model, bid).route(x.reshape(-1, x.shape[-1]))
        np.testing.assert_array_equal(routing.top_ids.numpy(), experts.numpy())
        np.testing.assert_allclose(routing.applied.numpy(), applied.numpy(), rtol=1e-5, atol=1e-7)
        sums = routing.applied.sum(-1) / ckpt.routed_scale
        assert torch.allclose(sums, torch.ones_like(sums)) == ckpt.norm_topk_prob


def test_the_block_output_is_transformers_own(family):
    """The experts as calibration reads them from the checkpoint, run by its MoE block (with the family's shared
    expert), give the output of transformers' block on the same input."""
    folder, model, routers, _ = family
    ckpt = open_checkpoint(folder)
    for bid, (x, *_) in zip(ckpt.moe_layers, routers):
        reference = model.model.layers[bid].mlp
        moe = block(ckpt, model, bid)
        with torch.no_grad():
            expected = reference(x[None])
            got = moe(x[None])
        if ckpt.arch.hf_moe_returns_scores:
            expected, got = expected[0], got[0]
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def block(ckpt, model, bid: int) -> StatisticsMoE:
    """Layer ``bid``'s MoE block as calibration builds it, the shared expert taken from ``model``."""
    router, experts = load_experts(ckpt, bid)
    moe = StatisticsMoE(router, experts, ckpt.arch.expert_activation.glu(ckpt.config),
                        RoutingRule.of(ckpt), np.arange(0), shared=ckpt.arch.shared_expert,
                        returns_scores=ckpt.arch.hf_moe_returns_scores)
    for name in ckpt.arch.shared_modules:
        setattr(moe, name, getattr(model.model.layers[bid].mlp, name))
    return moe


def test_the_fisher_information_is_transformers_backward(family):
    """The streamed backward (each layer read again, its experts recomputed one at a time, the family's shared
    expert and dense first layer included) gives the gradients of transformers' whole model."""
    from helpers import assert_same_fisher, transformers_fisher

    folder, model, _, stats = family
    assert_same_fisher(stats.fisher, transformers_fisher(model, folder, SETTINGS, CALIBRATION_TEXT))
