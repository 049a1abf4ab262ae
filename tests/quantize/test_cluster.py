"""calibrate --ray and compress --ray: the experts' errors measured and the experts quantized by a real Ray cluster
(two nodes on this machine, started by the test), the files the same byte for byte as one process writes, the
GGUF after a node is lost and after the driver is killed and started again (ray_scenario.py runs that in network and PID namespaces of its own: Ray reachable from 127.0.0.1
only, every process it starts gone with it)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mc_gguf.cli import main

pytest.importorskip("ray", reason="Ray is the optional extra mc-gguf[ray] (make test installs it)")

# the tuning's default sweeps: tasks long enough that the node and the driver die while experts are in flight
ARGS = ["--bits", "3", "--tokens", "1024", "--seq-len", "128", "--types", "Q2_K", "Q4_K", "Q8_0", "-q"]
# the calibration compress runs with those (its --hessian: tuning's Hessians)
CALIBRATE_ARGS = ["--tokens", "1024", "--seq-len", "128", "--types", "Q2_K", "Q4_K", "Q8_0", "--hessian", "-q"]
SCENARIO = Path(__file__).with_name("ray_scenario.py")


def namespaces_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"],
                          capture_output=True).returncode == 0


def test_calibrate_and_compress_on_a_ray_cluster_give_the_same_files_after_a_lost_node_and_a_restarted_driver(
        tiny_model_dir, tmp_path, capsys):
    if not namespaces_available():
        pytest.fail("this test keeps Ray on the loopback in a network namespace of its own: it needs unshare "
                    "(util-linux), ip (iproute2) and the right to create namespaces (root)")
    plain = tmp_path / "plain.gguf"
    assert main(["compress", str(tiny_model_dir), *ARGS, "-o", str(plain)]) == 0
    plain_stats = tmp_path / "plain.stats"
    assert main(["calibrate", str(tiny_model_dir), *CALIBRATE_ARGS, "-o", str(plain_stats)]) == 0
    capsys.readouterr()
    work = tmp_path / "cluster"
    work.mkdir()
    result = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", sys.executable, str(SCENARIO),
                             str(tiny_model_dir), str(work), json.dumps(ARGS), json.dumps(CALIBRATE_ARGS)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    reference = hashlib.sha256(plain.read_bytes()).hexdigest()
    # the experts' errors measured by the cluster's tasks: the very statistics file of one process
    assert report["calibrate"]["rc"] == 0, report["calibrate"]["output"]
    assert "layer 2/2: errors: 100%" in report["calibrate"]["output"], report["calibrate"]["output"]
    assert report["calibrate"]["sha256"] == hashlib.sha256(plain_stats.read_bytes()).hexdigest()
    n_experts = 2 * 4  # the tiny model's layers x experts
    # the node died while experts were in flight; the file is still the one process's
    assert 1 <= report["node_lost"]["saved_experts"] < n_experts and not report["node_lost"]["finished"], report
    assert report["lost_node_run"]["rc"] == 0, report["lost_node_run"]["output"]
    assert report["lost_node_run"]["sha256"] == reference
    # the driver died before the file was written; started again, it resumed with the experts saved so far
    assert 1 <= report["driver_killed"]["saved_experts"] < n_experts and not report["driver_killed"]["finished"]
    assert report["restarted_run"]["rc"] == 0, report["restarted_run"]["output"]
    assert report["restarted_run"]["resumed"] and not report["lost_node_run"]["resumed"]
    assert report["restarted_run"]["sha256"] == reference
    assert not report["lost_node_run"]["work_folder_left"] and not report["restarted_run"]["work_folder_left"]


def test_a_device_with_ray_is_refused_before_any_work(tiny_model_dir, tmp_path):
    """The tasks run on the cluster's CPUs: --device with --ray is refused first (here no CUDA is seen either,
    which the command line refuses earlier, so the stages are called as the Python API calls them)."""
    from dataclasses import replace

    from mc_gguf.calibrate.calibration import calibrate
    from mc_gguf.calibrate.settings import CalibrationSettings
    from mc_gguf.calibrate.text import CalibrationText
    from mc_gguf.errors import InvalidValueError
    from mc_gguf.pipeline import compress
    from mc_gguf.settings import CompressSettings

    settings = CompressSettings(ray="127.0.0.1:9")
    for wrong in (replace(settings, calibration=replace(settings.calibration, device="cuda")),
                  replace(settings, tune=replace(settings.tune, device="cuda"))):
        with pytest.raises(InvalidValueError, match="--device cuda with --ray"):
            compress(tiny_model_dir, tmp_path / "out.gguf", settings=wrong, progress=False)
    with pytest.raises(InvalidValueError, match="--device cuda with --ray"):
        calibrate(tiny_model_dir, tmp_path / "out.stats", CalibrationText("t", "text"),
                  CalibrationSettings(device="cuda"), progress=False, ray="127.0.0.1:9")
    assert list(tmp_path.iterdir()) == []


def test_ray_without_a_cluster_is_one_clear_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["compress", str(tiny_model_dir), *ARGS, "--ray", "127.0.0.1:9", "-o", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code == 1 and "no Ray cluster at 127.0.0.1:9" in err and "ray start --head" in err, err
    assert "Traceback" not in err
