"""Package-level names resolved on first use (PEP 562), so that importing a stage package stays cheap.

``mc_gguf.calibrate.calibrate`` is the calibration verb, but importing
``mc_gguf.calibrate`` (say, for its settings) must not import torch: each
stage package lists its public names and the module that defines each, and
the module is imported only when the name is first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name to its submodule."""
    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
