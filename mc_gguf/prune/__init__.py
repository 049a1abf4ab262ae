"""Online Dynamic Pruning: the rule the runtime applies, its thresholds, and a transformers reference.

rule.py (the rule, its parameters, thresholds for a skip share),
calibration.py (thresholds measured on text or taken from calibration
statistics, written into a GGUF), reference.py (the rule on transformers).
"""

from mc_gguf._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "OdpParams": "rule",
    "SlotCounts": "rule",
    "calibrate_odp": "calibration",
    "odp_from_stats": "calibration",
    "TransformersOdp": "reference",
})
