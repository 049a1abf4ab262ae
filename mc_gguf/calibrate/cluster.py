"""The calibration's error pass as Ray tasks (`calibrate --ray`, `compress --ray`): each expert's eps measured on
a machine of the cluster, the statistics the same as one process measures.

After a layer's forward the driver puts the layer's eps sample (its sampled tokens' MoE inputs, experts and
weights: eps_tokens x H floats, 128 MB at Mixtral's shapes and the default 8192 tokens) in Ray's object store
once, and asks for one task per expert; each task reads its expert's weights from the checkpoint itself (the
same path on every machine: one machine, or a folder they all mount) and returns its eps [3, T]. The driver
runs the next layer's forward meanwhile and takes the layer's errors after it (calibration.py), so at most two
layers' samples are alive. A task lost with its worker runs again (Ray's retries); one that fails in mc-gguf's
code ends the run with one line naming its layer and expert; a driver started again resumes at the first layer
whose statistics were not saved (workdir.py), as without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mc_gguf.calibrate.quant_error import EpsSample, sample_errors
from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.calibrate.stats import LayerStats
from mc_gguf.ray_cluster import remote_task, task_result


@dataclass(frozen=True)
class ErrorJob:
    """What every task of a run needs: small, put in Ray's object store once."""
    model_dir: str
    settings: CalibrationSettings


class ClusterErrors:
    """``submit(bid, layer_stats, sample)`` puts a layer's experts in flight; ``collect(bid, layer_stats)`` fills
    its eps with their results, in the experts' order."""

    def __init__(self, model_dir: str | Path, settings: CalibrationSettings):
        import ray

        self._job = ray.put(ErrorJob(str(Path(model_dir).resolve()), settings))
        self._task = remote_task(expert_eps)
        self._pending: dict[int, list] = {}  # bid -> the ObjectRefs of its experts' tasks

    def submit(self, bid: int, layer_stats: LayerStats, sample: EpsSample) -> None:
        import ray

        sample_ref = ray.put(sample.numpy())
        imatrix_in, imatrix_mid = layer_stats.imatrix("in"), layer_stats.imatrix("mid")
        self._pending[bid] = [self._task.remote(self._job, sample_ref, bid, xid, imatrix_in[xid], imatrix_mid[xid])
                              for xid in range(layer_stats.eps.shape[1])]

    def collect(self, bid: int, layer_stats: LayerStats, on_expert=lambda: None) -> None:
        for xid, ref in enumerate(self._pending.pop(bid)):
            layer_stats.eps[:, xid] = task_result(ref, f"layer {bid} expert {xid} (its quantization errors)")
            on_expert()


_CHECKPOINTS: dict[str, object] = {}  # a worker's checkpoint of the job it last ran (Ray reuses workers)


def expert_eps(job: ErrorJob, sample: tuple[np.ndarray, np.ndarray, np.ndarray], bid: int, xid: int,
               imatrix_in: np.ndarray, imatrix_mid: np.ndarray) -> np.ndarray:
    """A task: eps [3, T] of expert ``xid`` of layer ``bid``, as calibration.py measures it in one process."""
    from mc_gguf.calibrate.forward import load_expert
    from mc_gguf.device import torch_device
    from mc_gguf.hf.checkpoint import open_checkpoint

    ckpt = _CHECKPOINTS.get(job.model_dir)
    if ckpt is None:
        _CHECKPOINTS.clear()
        ckpt = _CHECKPOINTS[job.model_dir] = open_checkpoint(job.model_dir)
    device = torch_device(job.settings.device)
    eps_sample = EpsSample(*(torch.from_numpy(np.array(a)).to(device) for a in sample))  # writable copies
    glu = ckpt.arch.expert_activation.glu(ckpt.config)
    return sample_errors(load_expert(ckpt, bid, xid), eps_sample, bid, xid, glu, imatrix_in, imatrix_mid,
                         job.settings)
