"""``/metrics`` of ``mc-gguf serve``: the model's expert slot counters (the patches' counters, llama-context.cpp
mc_expert_stats, as ``expert_stats()`` reads them) in Prometheus' text exposition format, read only while no
request decodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mc_gguf.prune.rule import SlotCounts

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format


class SlotReader:
    """The model's slot counters, read when no request is running.

    Reading them waits for the graph's last ubatch and folds its counts (llama-context.cpp mc_expert_stats), which
    must not happen while another thread decodes: they are read under llama_cpp.server's model lock, and while a
    request holds it ``/metrics`` answers the counts of the last read rather than wait for the request to end.
    """

    def __init__(self, llm, lock):
        self.llm, self.lock = llm, lock
        self.last = llm.expert_stats()

    async def read(self) -> SlotCounts:
        import anyio

        try:
            self.lock.acquire_nowait()
        except anyio.WouldBlock:
            return self.last
        try:
            self.last = self.llm.expert_stats()
        finally:
            self.lock.release()
        return self.last


def metrics_text(counts: SlotCounts) -> str:
    """``counts`` in Prometheus' text format: the slots computed and skipped since the server started and the share
    skipped. A slot is one (token, layer, routed expert) the router chose."""
    computed, skipped = sum(counts.computed), sum(counts.skipped)
    rows = [
        ("mc_gguf_expert_slots_computed_total", "counter", "Expert slots computed (token, layer, routed expert).",
         computed),
        ("mc_gguf_expert_slots_skipped_total", "counter", "Expert slots Online Dynamic Pruning skipped.", skipped),
        ("mc_gguf_expert_slots_skipped_ratio", "gauge", "Share of the expert slots skipped: skipped / (computed + "
         "skipped), 0 before any slot.", counts.skipped_share),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
