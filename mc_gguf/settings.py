"""One compress run's settings: the stages' settings composed, with the defaults of `mc-gguf compress` and of
``mc_gguf.compress`` alike (the command line builds its flags' defaults from these).

    CompressSettings(bits=2.5)                       # compress's defaults: tuned, a type per projection
    CompressSettings(bits=3, tune=None)              # ggml's quantizer alone (--no-tune)
    CompressSettings(bits=3, odp=OdpSettings(skip=0.25))

Free of heavy imports: only the stages' settings modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mc_gguf.allocate.cost import COMPRESS_COST
from mc_gguf.allocate.settings import AllocateSettings
from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.prune.settings import DEFAULT_RENORMALIZE, DEFAULT_RULE
from mc_gguf.quantize.settings import TuneSettings

DEFAULT_BITS = 2.5


@dataclass(frozen=True)
class OdpSettings:
    """Online Dynamic Pruning thresholds written into the file (prune/)."""

    skip: float = 0.0                        # share of expert slots to skip; 0: no thresholds
    rule: str = DEFAULT_RULE                 # prune/settings.py THRESHOLD_RULES
    renormalize: bool = DEFAULT_RENORMALIZE  # mc.odp.renormalize


@dataclass(frozen=True)
class CompressSettings:
    """Everything compress decides besides the model, the output and the calibration text."""

    bits: float = DEFAULT_BITS               # average bits per expert weight, scales included
    size: int | None = None                  # or the largest file in bytes (the budget then; bits unused)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    # compress's cost (the summed squared MoE-block output error), and a type per projection when tuning
    allocation: AllocateSettings = field(default_factory=lambda: AllocateSettings(per_projection=None,
                                                                                  **COMPRESS_COST))
    tune: TuneSettings | None = field(default_factory=TuneSettings)  # None: ggml's quantizer (with gptq: GPTQ)
    gptq: bool = False                       # GPTQ without tuning (tuning always starts from GPTQ)
    odp: OdpSettings = field(default_factory=OdpSettings)
    ray: str | None = None                   # a Ray cluster's address ("auto": this machine's) for the experts' work

    @property
    def uses_gptq(self) -> bool:
        return self.gptq or self.tune is not None

    def resolved(self) -> CompressSettings:
        """The settings as the stages take them: the Hessians' inputs kept where GPTQ needs them, the
        calibration measuring only the candidate types, the per-projection default chosen by tuning."""
        calibration = self.calibration
        if self.uses_gptq and not calibration.hessian:
            calibration = replace(calibration, hessian=True)
        if self.allocation.types:
            calibration = replace(calibration, types=tuple(self.allocation.types))
        per_projection = self.allocation.per_projection
        allocation = replace(self.allocation, per_projection=self.tune is not None if per_projection is None
                             else per_projection)
        return replace(self, calibration=calibration, allocation=allocation)
