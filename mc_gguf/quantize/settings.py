"""How quantize tunes: the settings, free of heavy imports (the command line reads their defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TuneSettings:
    """tune.py's coordinate descent after GPTQ."""

    iters: int = 4              # sweeps at most (8 gained nothing measurable over 4 on held-out text)
    min_gain: float = 0.005     # stop when a sweep lowers the loss by less than this share of it
    device: str = "cpu"
    # the descent in float64 instead of float32: 2-3x slower, and converges to the last bit of a local
    # optimum (the brute-force tests use it)
    exact: bool = False
    # IQ1_S, IQ2_XXS and IQ2_XS: move each group of 8 weights to another point of ggml's grid too, not only
    # the scales (tune.py's _lattice_codes; --tune-lattice): 12-19% lower KLD at 2.06-2.25 expert bits on the
    # bench model, at 1.9-5.1x those types' tuning time at Mixtral's shapes, so not by default
    lattice: bool = False
