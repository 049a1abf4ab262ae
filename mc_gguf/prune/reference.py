"""ODP on a transformers model: the reference the runtime's pruned logits and slot counts are tested against."""

from __future__ import annotations

from collections.abc import Sequence

from mc_gguf.prune.rule import DEFAULT_PROTECT_RATIO, SlotCounts, keep_mask, validate_params


class TransformersOdp:
    """ODP applied to a transformers MoE model (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2: top-k of a softmax
    router) by replacing each MoE layer's router forward (dense layers have none). The kept weights are
    renormalised where the router renormalises (Mixtral always, the others as their ``norm_topk_prob`` says),
    then multiplied by DeepSeek's ``routed_scaling_factor``, as the runtime's ODP does.

    Used as a context manager; counts slots per layer like the runtime does.
    """

    def __init__(self, model, mu: Sequence[float], protect_ratio: float = DEFAULT_PROTECT_RATIO):
        layers = model.model.layers
        validate_params(mu, protect_ratio, len(layers))
        self.model = model
        self.mu = list(mu)
        self.protect_ratio = protect_ratio
        self.counts = SlotCounts([0] * len(layers), [0] * len(layers))
        self._saved = []

    def __enter__(self) -> TransformersOdp:
        for il, layer in enumerate(self.model.model.layers):
            router = getattr(layer.mlp, "gate", None)
            if not hasattr(router, "top_k"):  # a dense layer's FFN (its gate_proj is no router)
                continue
            self._saved.append((router, router.forward))
            router.forward = self._pruning_forward(il, router)
        return self

    def __exit__(self, *exc) -> None:
        for router, forward in self._saved:
            router.forward = forward
        self._saved.clear()

    def _pruning_forward(self, il: int, router):
        import torch
        import torch.nn.functional as F

        def forward(hidden_states):
            hidden = hidden_states.reshape(-1, router.hidden_dim)
            logits = F.linear(hidden, router.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            top_values, top_indices = torch.topk(probs, router.top_k, dim=-1)
            if self.mu[il] > 0.0:
                keep = torch.from_numpy(keep_mask(top_values.detach().numpy(), self.mu[il],
                                                  hidden.detach().float().numpy(), self.protect_ratio))
            else:
                keep = torch.ones_like(top_values, dtype=torch.bool)
            # A pruned slot keeps its expert index with weight 0: its output is multiplied
            # by exactly 0. (An out-of-range "skip" index is not safe: transformers' grouped
            # expert kernels leave such rows uninitialised.)
            top_values = top_values * keep
            if getattr(router, "norm_topk_prob", getattr(self.model.config, "norm_topk_prob", True)):
                top_values = top_values / top_values.sum(dim=-1, keepdim=True)
            top_values = top_values * getattr(router, "routed_scaling_factor", 1.0)
            kept = int(keep.sum())
            self.counts.computed[il] += kept
            self.counts.skipped[il] += keep.numel() - kept
            return logits, top_values.to(hidden_states.dtype), top_indices

        return forward
