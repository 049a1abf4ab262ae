"""The torch device a run computes on (``--device``), checked before any work.

Names are torch's: ``cpu``, ``cuda`` or ``cuda:N``, ``mps``. ``device_name`` checks the spelling without
importing torch (the CLI's argument type: ``--help`` stays light); ``torch_device`` checks that this torch
build and machine have the device, in the first second of a command, not after an hour of calibration.
"""

from __future__ import annotations

import re

from mc_gguf.errors import InvalidValueError

DEVICE_NAMES = ("cpu", "cuda", "mps")
_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def device_name(text: str) -> str:
    """``text`` as a device name, or an InvalidValueError naming the choices."""
    name = str(text).strip().lower()
    if not _PATTERN.match(name):
        raise InvalidValueError(f"unknown device {text!r}: choose cpu, cuda, cuda:N or mps")
    return name


def torch_device(text: str):
    """The torch.device of ``text``, refused with a clear error where torch or the machine lacks it."""
    import torch

    name = device_name(text)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this torch is a CPU build" if torch.version.cuda is None
                   else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise InvalidValueError(f"--device {name}: {why}; use --device cpu, or install torch with CUDA")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InvalidValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif name == "mps" and not (torch.backends.mps.is_built() and torch.backends.mps.is_available()):
        raise InvalidValueError("--device mps: Metal (MPS) is not available to this torch on this machine "
                                "(it needs Apple silicon and a torch built with MPS); use --device cpu")
    return torch.device(name)
