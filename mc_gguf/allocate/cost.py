"""The significance cost of quantizing an expert to a type, and the exponents it is used with.

    c(e, b) = phi_e^alpha * w_e^beta * eps(e, b)^gamma

(phi: activation frequency, w: summed routing weight, eps: output error of
the expert at type b; calibrate/stats.py defines all three). Plain
arithmetic on arrays: this module imports nothing, so the command line reads
the defaults from it without loading numpy or scipy.
"""

from __future__ import annotations

# The MC authors' exponents (their code; the paper writes gamma = 2): `mc-gguf allocate`'s default.
AUTHORS_COST = {"alpha": 1.0, "beta": 1.5, "gamma": 1.0}

# compress's exponents: the summed squared MoE-block output error. phi and w
# are already inside eps, and the errors of different experts add up as
# squares. On the bench model at 2.5 bits (GPTQ) this gave a mean KLD of
# 0.0030 where the authors' exponents gave 0.0066.
COMPRESS_COST = {"alpha": 0.0, "beta": 0.0, "gamma": 2.0}


def significance_cost(phi, w, eps, alpha: float = AUTHORS_COST["alpha"], beta: float = AUTHORS_COST["beta"],
                      gamma: float = AUTHORS_COST["gamma"]):
    """c(e, b) = phi_e^alpha * w_e^beta * eps(e, b)^gamma, for numpy arrays phi, w [E] and eps [E, T]."""
    return (phi ** alpha * w ** beta)[:, None] * eps ** gamma
