"""quantize's per-expert work as Ray tasks (`--ray [ADDRESS]`): GPTQ and tuning of each expert on the machines
of a Ray cluster, the file the same byte for byte as one process writes. (The tuned-error ratios' sampled
experts run as tasks too: tuned_errors.py; joining the cluster and the tasks' results: ray_cluster.py.)

An expert's three projections are one task: gate and up quantized, then down fit to what they give it (as
experts.ExpertQuantizer does on one machine; that class runs inside the task). The driver keeps the GGUF
writer and asks for the experts in the writer's order; the experts of the layer asked for and of the next
LOOKAHEAD layers (more where the cluster has more CPUs than those layers have experts) are in flight
meanwhile, so the workers quantize while the driver writes.

What a task reads: the checkpoint and the statistics file from the same paths as the driver (one machine, or a
folder every machine mounts: NFS, a cluster file system), its expert's weights and its layer's MoE inputs
itself. Nothing large travels through Ray: a task gets the plan and the paths, and returns its expert's bytes.

Faults: a task whose worker or machine is lost runs again elsewhere (Ray's retries, ray_cluster.MAX_RETRIES); each expert's
bytes are saved in the work folder as they arrive, so a driver started again with the same command loads them
instead of asking again; a task that fails in mc-gguf's code ends the run with one line naming its layer and
expert.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mc_gguf.allocate.plan import Plan
from mc_gguf.atomic import atomic_output
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.errors import McGgufError
from mc_gguf.gguf_io.layout import PROJECTIONS
from mc_gguf.quantize.settings import TuneSettings
from mc_gguf.ray_cluster import remote_task, task_result

LOOKAHEAD = 1           # layers whose experts are in flight beyond the one being written, at least


@dataclass(frozen=True)
class ExpertJob:
    """What every task of a run needs: small, put in Ray's object store once."""

    model_dir: str
    plan: Plan
    stats_path: str
    gptq: bool
    tune: TuneSettings | None
    digest: str  # names the job's results in the work folder, and a worker's quantizer of it

    @classmethod
    def of(cls, model_dir: str | Path, plan: Plan, stats: CalibrationStats | None, gptq: bool,
           tune: TuneSettings | None) -> ExpertJob:
        stats_path = stats_file(stats)
        # the plan, the statistics and how experts are quantized, not the machines or the device they run on
        key = {"plan": asdict(plan), "stats": {"info": stats.info, "bytes": Path(stats_path).stat().st_size},
               "gptq": gptq, "tune": None if tune is None else {**asdict(tune), "device": None}}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cls(str(Path(model_dir).resolve()), plan, stats_path, gptq, tune, digest)


def stats_file(stats: CalibrationStats | None) -> str:
    """The statistics' file as the workers open it (they read it themselves, from the same path), or what to do."""
    if stats is None or stats.path is None:
        raise McGgufError("--ray: the workers read the calibration statistics from their file (quantize --stats); "
                          "these have none")
    return str(Path(stats.path).resolve())


class ClusterExperts:
    """``experts(bid, xid, projection)``: ExpertQuantizer's bytes of one expert projection, computed by a Ray task
    per expert and kept in ``folder`` as they arrive. ``layers``: the MoE layers, in the order they are written."""

    def __init__(self, job: ExpertJob, layers: list[int], n_experts: int, folder: Path):
        import ray

        self.layers, self.n_experts, self.folder = layers, n_experts, folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._job_ref = ray.put(job)
        self._task = remote_task(quantize_expert)
        self._pending: dict[tuple[int, int], object] = {}  # (bid, xid) -> the task's ObjectRef
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.lookahead = max(LOOKAHEAD, -(-cpus // n_experts) - 1)  # every CPU busy
        self._loaded: tuple[int, int, dict[str, np.ndarray]] | None = None

    def __call__(self, bid: int, xid: int, projection: str) -> np.ndarray:
        if self._loaded is None or self._loaded[:2] != (bid, xid):
            self._submit(bid)
            self._loaded = (bid, xid, self._result(bid, xid))
        return self._loaded[2][projection]

    def remove(self) -> None:
        """The file is written: the experts kept for it go, and the work folder when nothing else is left."""
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.folder.parent.rmdir()

    def _path(self, bid: int, xid: int) -> Path:
        return self.folder / f"layer{bid}-expert{xid}.npz"

    def _submit(self, bid: int) -> None:
        """Put the experts of layer ``bid`` and of the LOOKAHEAD layers after it in flight, but those done."""
        first = self.layers.index(bid)
        for layer in self.layers[first:first + 1 + self.lookahead]:
            for xid in range(self.n_experts):
                if (layer, xid) not in self._pending and not self._path(layer, xid).exists():
                    self._pending[layer, xid] = self._task.remote(self._job_ref, layer, xid)

    def _result(self, bid: int, xid: int) -> dict[str, np.ndarray]:
        """The expert's bytes, from the work folder, or from its task (then saved there)."""
        path = self._path(bid, xid)
        ref = self._pending.pop((bid, xid), None)
        if ref is not None:
            result = task_result(ref, f"layer {bid} expert {xid}")
            with atomic_output(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **result)
            return result
        try:
            with np.load(path) as saved:
                return {p: saved[p] for p in PROJECTIONS}
        except (OSError, ValueError, KeyError) as exc:  # a damaged file: computed again
            path.unlink(missing_ok=True)
            self._submit(bid)
            if (bid, xid) not in self._pending:
                raise McGgufError(f"{path}: unreadable ({exc})") from None
            return self._result(bid, xid)


_QUANTIZERS: dict[str, object] = {}  # a worker's quantizer of the job it last ran, by digest (Ray reuses workers)


def quantize_expert(job: ExpertJob, bid: int, xid: int) -> dict[str, np.ndarray]:
    """A task: expert ``xid`` of layer ``bid``, its three projections' ggml bytes, as one process computes them."""
    from mc_gguf.calibrate.stats import load_stats
    from mc_gguf.hf.checkpoint import open_checkpoint
    from mc_gguf.quantize.hessian import ExpertHessians
    from mc_gguf.quantize.experts import ExpertQuantizer

    quantizer = _QUANTIZERS.get(job.digest)
    if quantizer is None:
        _QUANTIZERS.clear()
        ckpt, stats = open_checkpoint(job.model_dir), load_stats(job.stats_path)
        device = job.tune.device if job.tune is not None else "cpu"
        hessians = ExpertHessians(ckpt, stats, device) if job.gptq else None
        quantizer = _QUANTIZERS[job.digest] = ExpertQuantizer(ckpt, job.plan, stats, hessians, job.tune)
    return {projection: quantizer(bid, xid, projection) for projection in PROJECTIONS}
