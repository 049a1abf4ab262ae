"""A calibration's unfinished work: finished layers and the hidden states after the last one.

Kept in ``<STATS>.partial.d`` until the statistics file is written, so that a
rerun with the same inputs continues at the first unfinished layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mc_gguf.calibrate.stats import LayerStats, layer_arrays, read_layers
from mc_gguf.errors import McGgufError


class WorkDir:
    """Finished layers and the current hidden states, kept until the statistics file is written."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path = path
        stamp = path / "inputs.json"
        wanted = json.dumps(fingerprint, sort_keys=True)
        if path.exists() and (not stamp.exists() or stamp.read_text() != wanted):
            shutil.rmtree(path)  # left by a run with other inputs: start over
        path.mkdir(exist_ok=True)
        stamp.write_text(wanted)

    def hidden_path(self, il: int) -> Path:
        return self.path / f"hidden-{il}.f32"

    def new_hidden(self, il: int, shape: tuple[int, ...]) -> np.memmap:
        return np.lib.format.open_memmap(self.hidden_path(il), mode="w+", dtype=np.float32, shape=shape)

    def open_hidden(self, il: int, shape: tuple[int, ...]) -> np.memmap:
        try:
            hidden = np.lib.format.open_memmap(self.hidden_path(il), mode="r")
        except (FileNotFoundError, ValueError):
            raise McGgufError(f"{self.path}: the hidden states before layer {il} are missing or damaged; "
                              f"delete the folder to start over") from None
        if hidden.shape != shape:
            raise McGgufError(f"{self.hidden_path(il)} has shape {hidden.shape}, expected {shape}")
        return hidden

    def layer_path(self, il: int) -> Path:
        return self.path / f"layer-{il}.safetensors"

    def first_unfinished_layer(self, n_layers: int) -> int:
        il = 0
        while il < n_layers and self.layer_path(il).exists():
            il += 1
        return il

    def save_layer(self, il: int, layer: LayerStats) -> None:
        from safetensors.numpy import save_file

        tmp = self.layer_path(il).with_suffix(".partial")
        save_file(layer_arrays([layer], first=il), str(tmp))
        tmp.rename(self.layer_path(il))

    def load_layers(self, n_layers: int) -> list[LayerStats]:
        from safetensors.numpy import load_file

        arrays = {}
        for il in range(n_layers):
            arrays.update(load_file(str(self.layer_path(il))))
        return read_layers(arrays, n_layers)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
