"""How ODP thresholds are chosen, as plain data (the command line reads it without loading numpy).

- ``sensitivity`` (default): one threshold per layer and expert, chosen by the measured cost of skipping the
  slots routed to that expert (budget.py, mc.odp.mu_exps);
- ``sensitivity-layer``: one threshold per layer, the layers' shares chosen by that cost (budget.py);
- ``quantile``: the same quantile of w1/w0 in every layer, the paper's rule (rule.py).
"""

THRESHOLD_RULES = ("sensitivity", "sensitivity-layer", "quantile")
DEFAULT_RULE = "sensitivity"

# Whether the weights a token keeps are renormalised after pruning (mc.odp.renormalize). The paper's rule
# renormalises; leaving them as they are drops the skipped slot's share of the output instead of handing it to
# the experts kept, which moves the output less (bench_odp.py).
DEFAULT_RENORMALIZE = False
