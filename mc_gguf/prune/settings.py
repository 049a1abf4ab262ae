"""How ODP thresholds are chosen, as plain data (the command line reads it without loading numpy).

- ``sensitivity`` (default): per-layer shares chosen by the measured cost of skipping (budget.py);
- ``quantile``: the same quantile of w1/w0 in every layer, the paper's rule (rule.py).
"""

THRESHOLD_RULES = ("sensitivity", "quantile")
DEFAULT_RULE = "sensitivity"
