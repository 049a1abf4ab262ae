"""A Ray cluster of two nodes on this machine, a calibration on it, a compress on it that loses a node and its driver, and the same
compress started again: run by tests/quantize/test_cluster.py as

    unshare --net --pid --fork --mount-proc python ray_scenario.py MODEL_DIR WORK_DIR COMPRESS_ARGS_JSON CALIBRATE_ARGS_JSON

In its own network namespace the loopback is the only interface, so Ray's servers (which bind every interface
and advertise the machine's address) are reachable from 127.0.0.1 only; in its own PID namespace every process
it starts ends with it; in its own mount namespace Ray's files (/tmp/ray: sessions, logs, the address `ray
start` leaves for `--ray` alone) go to a tmpfs that ends with it too. Prints one JSON line: what happened, and the sha256 of the file written.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PORT = 6390
WORKER_NODE_PORT = 6401  # the worker node's raylet: the process killed to lose the node
BIN = Path(sys.executable).parent


def isolate_ray_files() -> None:
    """A tmpfs over /tmp/ray, seen by this mount namespace only (unshare makes its mounts private)."""
    ray_dir = Path(tempfile.gettempdir()) / "ray"
    ray_dir.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(ray_dir)], check=True)


def ray(*args: str) -> float:
    started = time.monotonic()
    result = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if result.returncode != 0:
        raise SystemExit(f"ray {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.monotonic() - started


def raylet_of_worker_node() -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"raylet") and f"--node_manager_port={WORKER_NODE_PORT}".encode() in cmdline:
            return int(pid)
    raise SystemExit("the worker node's raylet is not running")


def saved_experts(out: Path) -> int:
    return sum(1 for _ in out.parent.glob(f".{out.name}.mc-gguf/experts-*/*.npz"))


def main() -> None:
    model, work, args, calibrate_args = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    isolate_ray_files()
    report = {"head_start_s": ray("start", "--head", "--port", str(PORT), "--num-cpus", "1",
                                  "--include-dashboard=false", "--disable-usage-stats"),
              "worker_start_s": ray("start", "--address", f"127.0.0.1:{PORT}", "--num-cpus", "1",
                                    "--node-manager-port", str(WORKER_NODE_PORT))}
    deadline = time.monotonic() + 900

    def compress(out: Path, quiet: bool = True) -> list[str]:
        flags = args if quiet else [a for a in args if a not in ("-q", "--quiet")]  # says when it resumes
        return [str(BIN / "mc-gguf"), "compress", model, *flags, "--ray", f"127.0.0.1:{PORT}", "-o", str(out)]

    def start(out: Path) -> subprocess.Popen:
        driver = subprocess.Popen(compress(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while saved_experts(out) < 1 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return driver

    def finish(driver: subprocess.Popen, out: Path, name: str) -> None:
        output = driver.communicate(timeout=900)[0]
        report[name] = {"rc": driver.returncode, "output": output[-3000:], "resumed": "resuming the work in" in output,
                        "sha256": hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else None,
                        "work_folder_left": out.with_name(f".{out.name}.mc-gguf").exists()}

    # 0. the calibration alone, its experts' errors measured by both nodes' workers
    stats = work / "cluster.stats"
    # with its progress bars, which name the layers whose errors came from the cluster
    calibrated = subprocess.run([str(BIN / "mc-gguf"), "calibrate", model, *(a for a in calibrate_args if a != "-q"),
                                 "--ray",
                                 f"127.0.0.1:{PORT}", "-o", str(stats)], capture_output=True, text=True, timeout=900)
    report["calibrate"] = {"rc": calibrated.returncode, "output": (calibrated.stdout + calibrated.stderr)[-3000:],
                           "sha256": hashlib.sha256(stats.read_bytes()).hexdigest() if stats.exists() else None}
    # 1. the worker node is killed with experts in flight; the run goes on with the head's worker
    out = work / "lost-node.gguf"
    driver = start(out)
    os.kill(raylet_of_worker_node(), signal.SIGKILL)
    report["node_lost"] = {"saved_experts": saved_experts(out), "finished": driver.poll() is not None}
    finish(driver, out, "lost_node_run")
    # 2. the driver is killed after its first saved expert; the same command resumes
    out = work / "restarted.gguf"
    driver = start(out)
    driver.kill()
    driver.wait()
    report["driver_killed"] = {"saved_experts": saved_experts(out), "finished": out.exists()}
    finish(subprocess.Popen(compress(out, quiet=False), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out,
           "restarted_run")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
