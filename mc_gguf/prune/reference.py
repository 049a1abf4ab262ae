"""ODP on a transformers model: the reference the runtime's pruned logits and slot counts are tested against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mc_gguf.hf.architectures import architecture_for
from mc_gguf.prune.rule import DEFAULT_PROTECT_RATIO, OdpParams, SlotCounts, keep_mask


class TransformersOdp:
    """ODP applied to a transformers MoE model (any family of hf/architectures.py) by wrapping each MoE layer's
    router forward (the row's ``hf_router``; dense layers have none): a slot is kept when its weight is at least mu
    (the layer's, or with ``mu_exps`` its expert's) times the token's top weight. With ``renormalize`` the kept
    weights are renormalised where the router renormalises (Mixtral and gpt-oss always, the others as their
    ``norm_topk_prob`` says), as the runtime's ODP does; without, they stay as the router gave them.

    With ``means`` ([E, H] per layer, or None; prune/means.py) and the kept weights as they are, a skipped slot adds
    its weight times its expert's mean output to the MoE block's output, as the runtime does with a file's
    ``blk.N.ffn_odp_mean``.

    Used as a context manager; counts slots per layer like the runtime does.
    """

    def __init__(self, model, mu: Sequence[float], protect_ratio: float = DEFAULT_PROTECT_RATIO,
                 mu_exps: Sequence[Sequence[float]] | None = None, renormalize: bool = True,
                 means: Sequence[np.ndarray | None] | None = None):
        layers = model.model.layers
        self.params = OdpParams(list(mu), protect_ratio, None if mu_exps is None else [list(r) for r in mu_exps],
                                renormalize)
        if len(self.params.mu) != len(layers):
            raise ValueError(f"{len(self.params.mu)} thresholds for {len(layers)} layers")
        self.model = model
        self.mu = self.params.mu
        self.protect_ratio = protect_ratio
        self.counts = SlotCounts([0] * len(layers), [0] * len(layers))
        self.means = None if means is None or renormalize else list(means)
        self._dropped: dict[int, tuple] = {}  # layer -> (the skipped slots' weights [tokens, k], their experts)
        self._saved = []
        self._hooks = []

    def __enter__(self) -> TransformersOdp:
        arch = self.arch = architecture_for({"architectures": self.model.config.architectures})
        for il, layer in enumerate(self.model.model.layers):
            router = getattr(getattr(layer, arch.hf_moe_module), arch.hf_router, None)
            if not hasattr(router, "top_k"):  # a dense layer's FFN (its gate_proj is no router)
                continue
            self._saved.append((router, router.forward))
            router.forward = self._pruning_forward(il, router)
            if self.means is not None and self.means[il] is not None:
                self._hooks.append(getattr(layer, arch.hf_moe_module).register_forward_hook(self._mean_hook(il)))
        return self

    def __exit__(self, *exc) -> None:
        for router, forward in self._saved:
            router.forward = forward
        self._saved.clear()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _mean_hook(self, il: int):
        """The MoE block's output plus, for every skipped slot, its weight times its expert's mean output."""
        import torch

        mean = torch.from_numpy(np.asarray(self.means[il], dtype=np.float32))

        def hook(module, args, output):
            dropped, indices = self._dropped.pop(il)
            hidden = output[0] if isinstance(output, tuple) else output
            added = (dropped[..., None] * mean[indices]).sum(1).reshape(hidden.shape).to(hidden.dtype)
            return (hidden + added, *output[1:]) if isinstance(output, tuple) else hidden + added

        return hook

    def _pruning_forward(self, il: int, router):
        """The router's own forward (its gating, selection bias, groups, renormalisation and scale), then the
        pruning of its slots: kept weights renormalised to the sum the router gave (1, or DeepSeek's and GLM's
        routed_scaling_factor) where the family renormalises."""
        import torch

        route = router.forward
        renormalise = self.params.renormalize and self.arch.renormalizes(self.model.config.to_dict())

        def forward(hidden_states):
            logits, weights, indices = route(hidden_states)
            hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
            w = weights.float()
            if self.mu[il] > 0.0:
                mu = self.params.slot_thresholds(il, indices.numpy())
                keep = torch.from_numpy(keep_mask(w.detach().numpy(), mu, hidden.detach().float().numpy(),
                                                  self.protect_ratio))
            else:
                keep = torch.ones_like(w, dtype=torch.bool)
            # A pruned slot keeps its expert index with weight 0: its output is multiplied
            # by exactly 0. (An out-of-range "skip" index is not safe: transformers' grouped
            # expert kernels leave such rows uninitialised.)
            kept_w = w * keep
            if renormalise:
                kept_w = kept_w / kept_w.sum(dim=-1, keepdim=True) * w.sum(dim=-1, keepdim=True)
            if self.means is not None:
                self._dropped[il] = (w * ~keep, indices)
            kept = int(keep.sum())
            self.counts.computed[il] += kept
            self.counts.skipped[il] += keep.numel() - kept
            return logits, kept_w.to(weights.dtype), indices

        return forward
