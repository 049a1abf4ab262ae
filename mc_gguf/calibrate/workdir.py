"""A calibration's unfinished work: finished layers and the hidden states after the last one.

Kept in ``<STATS>.partial.d`` until the statistics file is written, so that a
rerun with the same inputs continues at the first unfinished layer. Every
step is written under a temporary name, flushed, fsync'd and renamed, so a
file with its final name is a finished step and anything else is redone:
``hidden-N.f32`` (the input of layer N), ``moe-input-N.f32`` (its MoE
block's inputs, with --hessian), ``fisher-input-N.f32`` (its input for
the first sequences, which fisher.py runs back through the layers) and
``layer-N.safetensors`` (its statistics) are the manifest of what is done.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path

import numpy as np

from mc_gguf.atomic import fsync_file, fsync_folder, reserve_space
from mc_gguf.calibrate.stats import (HESSIAN_PREFIX, LayerStats, TensorStats, layer_arrays, read_layers, read_tensors,
                                    tensor_arrays)
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

    def _partial(self, path: Path) -> Path:
        return path.with_name(path.name + ".partial")

    def _new_map(self, final: Path, shape: tuple[int, ...]) -> np.memmap:
        """A float32 file for ``final``, under a temporary name until ``_finish_map``: its blocks allocated
        before the first write through the map (a full disk is an error here, not SIGBUS there)."""
        partial = self._partial(final)
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
        try:
            with open(partial, "r+b") as f:
                reserve_space(f, array.offset + array.nbytes, f"the calibration's work file {partial}")
        except BaseException:
            del array
            partial.unlink(missing_ok=True)
            raise
        return array

    def _finish_map(self, final: Path, array: np.memmap) -> None:
        """The file is complete: flush, fsync and give it its final name."""
        array.flush()
        del array
        self._commit(self._partial(final), final)

    def _open_map(self, final: Path, what: str) -> np.memmap:
        try:
            return np.lib.format.open_memmap(final, mode="r")
        except (FileNotFoundError, ValueError):
            raise McGgufError(f"{self.path}: {what} are missing or damaged; delete the folder to start over") from None

    def _commit(self, tmp: Path, final: Path) -> None:
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_folder(self.path)

    def new_hidden(self, il: int, shape: tuple[int, ...]) -> np.memmap:
        """A file for the hidden states before layer ``il``, under a temporary name until ``finish_hidden``."""
        return self._new_map(self.hidden_path(il), shape)

    def finish_hidden(self, il: int, hidden: np.memmap) -> None:
        self._finish_map(self.hidden_path(il), hidden)

    def drop_hidden(self, il: int) -> None:
        self.hidden_path(il).unlink(missing_ok=True)

    def open_hidden(self, il: int, shape: tuple[int, ...]) -> np.memmap:
        hidden = self._open_map(self.hidden_path(il), f"the hidden states before layer {il}")
        if hidden.shape != shape:
            raise McGgufError(f"{self.hidden_path(il)} has shape {hidden.shape}, expected {shape}")
        return hidden

    def inputs_path(self, il: int) -> Path:
        return self.path / f"moe-input-{il}.f32"

    def new_inputs(self, il: int, shape: tuple[int, int]) -> np.memmap:
        """A file for layer ``il``'s MoE inputs, under a temporary name until ``finish_inputs``."""
        return self._new_map(self.inputs_path(il), shape)

    def finish_inputs(self, il: int, inputs: np.memmap) -> None:
        self._finish_map(self.inputs_path(il), inputs)

    def open_inputs(self, il: int) -> np.memmap:
        return self._open_map(self.inputs_path(il), f"the MoE inputs of layer {il}")

    def sample_path(self, il: int) -> Path:
        return self.path / f"fisher-input-{il}.f32"

    def keep_sample(self, il: int, hidden: np.ndarray) -> None:
        """Keep ``hidden`` [n_seq, length, H], the input of layer ``il`` for the sequences the Fisher information is
        measured on (fisher.py), unless a run before this one kept it."""
        if self.sample_path(il).exists():
            return
        kept = self._new_map(self.sample_path(il), hidden.shape)
        kept[:] = hidden
        self._finish_map(self.sample_path(il), kept)

    def open_sample(self, il: int) -> np.memmap:
        return self._open_map(self.sample_path(il), f"the kept inputs of layer {il}")

    def layer_path(self, il: int) -> Path:
        return self.path / f"layer-{il}.safetensors"

    def first_unfinished_layer(self, n_layers: int) -> int:
        il = 0
        while il < n_layers and self.layer_path(il).exists():
            il += 1
        return il

    def save_layer(self, il: int, layer: LayerStats | None, tensors: dict[str, TensorStats] | None = None) -> None:
        """Mark layer ``il`` done with its statistics (a dense layer's file holds no expert statistics) and its other
        tensors' (calibrate/tensors.py)."""
        from safetensors.numpy import save_file

        tmp = self._partial(self.layer_path(il))
        arrays = {name: value() if callable(value) else value for name, value in tensor_arrays(tensors or {}).items()}
        save_file({**layer_arrays([layer], first=il), **arrays}, str(tmp))
        self._commit(tmp, self.layer_path(il))

    def load_layers(self, n_layers: int, dense: Collection[int] = ()
                    ) -> tuple[list[LayerStats | None], dict[str, TensorStats]]:
        """Every layer's statistics, and the other tensors' of all layers (their Hessians left in the layers' files,
        each tensor with its reader)."""
        from safetensors import safe_open

        layers, tensors = {}, {}
        for il in range(n_layers):
            path = self.layer_path(il)
            with safe_open(str(path), framework="numpy") as f:
                names = list(f.keys())
                arrays = {name: f.get_tensor(name) for name in names if not name.startswith(HESSIAN_PREFIX)}
            layers.update(arrays)
            tensors.update(read_tensors(arrays, path, names))
        return read_layers(layers, n_layers, dense=dense), tensors

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
