"""Ray, as the stages use it for per-expert work (`--ray [ADDRESS]`): joining a cluster, and tasks whose results
come back in the order they were asked for, a lost one run again and a failed one reported in one line.

calibrate/cluster.py (the error pass's experts), quantize/cluster.py (GPTQ and tuning of the experts) and
quantize/tuned_errors.py (the sampled experts of the tuned-error ratios) build their tasks on these.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mc_gguf.device import device_name
from mc_gguf.errors import InvalidValueError, McGgufError

RAY_VERSION = "2.60.0"  # the extra mc-gguf[ray] pins it: a cluster's machines must run one Ray
MAX_RETRIES = 3         # runs of a task lost with its worker or machine, beyond the first (Ray's max_retries)

START_HINT = "start one with `ray start --head --port 6379`, and join the other machines with `ray start --address HEAD:6379`"
CONNECT_TIMEOUT_S = 5.0
# where `ray start` leaves the address of the cluster it started or joined last (ray._private.utils.read_ray_address)
RAY_CURRENT_CLUSTER = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def remote_task(function: Callable):
    """``function`` as a Ray task: one CPU and no GPU each, run again where its worker or machine is lost."""
    import ray

    return ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(function)


def check_device(device: str) -> None:
    """A task asks Ray for one CPU and no GPU (remote_task), so the experts' work runs on the workers' CPUs: a --device for the
    one-machine run is refused with --ray, before any work (the statistics and files are then the same as one
    process on its CPU makes)."""
    if device_name(device) != "cpu":
        raise InvalidValueError(f"--device {device} with --ray: the cluster's tasks run on its machines' CPUs; "
                                "leave --device out with --ray, or run on this machine alone with --device")


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (HOST:PORT; "auto": RAY_ADDRESS, else the cluster `ray start` last
    started or joined on this machine), or fail at once with what to do: the head is probed first, since
    ray.init waits a minute and more for one that is not there."""
    try:
        import ray
    except ImportError:
        raise McGgufError(f"--ray needs Ray: pip install 'mc-gguf[ray]' (ray {RAY_VERSION}, on every machine of "
                          "the cluster)") from None
    if ray.is_initialized():
        return
    resolved = address
    if address == "auto":
        resolved = os.environ.get("RAY_ADDRESS") or (
            RAY_CURRENT_CLUSTER.read_text().strip() if RAY_CURRENT_CLUSTER.is_file() else "")
        if not resolved:
            raise McGgufError(f"no Ray cluster on this machine (RAY_ADDRESS is not set): {START_HINT}, or give "
                              "--ray HOST:PORT")
    host, _, port = resolved.rpartition(":")
    if not host or not port.isdigit():
        raise McGgufError(f"--ray {resolved}: give the head's address as HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise McGgufError(f"no Ray cluster at {resolved} ({exc.strerror or exc}): {START_HINT}") from None
    try:
        ray.init(address=resolved, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise McGgufError(f"could not join the Ray cluster at {resolved}: {exc}") from None


def task_result(ref, what: str):
    """A task's result (ray.get), or one line naming ``what`` it was for: the error it raised in mc-gguf's code, or
    that it was lost more often than MAX_RETRIES allow (or the cluster with it)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise McGgufError(f"{what}: {getattr(exc, 'cause', None) or exc}") from None
    except ray.exceptions.RayError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise McGgufError(f"{what}: its Ray task was lost ({type(exc).__name__}: {detail})") from None


def ordered_results(function: Callable, calls: list[tuple], what: Callable[[tuple], str]) -> Iterator:
    """``function(*call)`` for every call as Ray tasks, all in flight at once, yielded in the calls' order."""
    task = remote_task(function)
    refs = [task.remote(*call) for call in calls]
    for call, ref in zip(calls, refs):
        yield task_result(ref, what(call))
