"""The patched ggml on Vulkan, run on Mesa's software driver (lavapipe): ``make test-vulkan``, not ``make test``.

Vulkan is not one of the backends that skip -1 expert ids (patch 0013's list): ggml-vulkan reads a -1 id as
an expert index. On lavapipe:

- test-backend-ops runs MUL_MAT_ID on Vulkan against the CPU, and declines its cases with skipped slots,
  which are marked as llama.cpp's graph marks them (0019), rather than run them with -1 ids;
- llama-perplexity with every layer offloaded to Vulkan runs a per-expert file with ODP as it runs on the CPU
  alone: the loader keeps the experts in CPU buffers and the scheduler runs their marked MUL_MAT_IDs there,
  while the rest of the model is on the Vulkan device.

The tools are built once from the patched tree with -DGGML_VULKAN=ON (runtime/stock.tools_dir).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mc_gguf.gguf_io.regroup import regroup_experts

from conftest import CALIBRATION_TEXT

pytestmark = pytest.mark.vulkan

# ggml-vulkan leaves devices of type CPU (lavapipe is one) out unless they are asked for by index
ENV = {**os.environ, "GGML_VK_VISIBLE_DEVICES": "0"}


@pytest.fixture(scope="module")
def vulkan_tools() -> Path:
    from mc_gguf.runtime.source import BuildFlags
    from mc_gguf.runtime.stock import tools_dir

    if shutil.which("glslc") is None:
        pytest.fail("glslc is not installed: run make test-vulkan, which installs what Vulkan needs")
    return tools_dir(BuildFlags(vulkan=True), ("test-backend-ops", "llama-perplexity"))


def run(command: list, timeout: int = 1200) -> str:
    result = subprocess.run([str(c) for c in command], env=ENV, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_mul_mat_id_runs_on_lavapipe_and_skipped_slots_are_declined(vulkan_tools):
    # 0005's cases with skipped slots (8 experts, 2 used, 64 x 256, 1 to 512 tokens), and a share of the
    # stock cases: 4 of 4 experts, 512 x 256, 1 and 32 tokens, every type (mat-vec and matrix-matrix paths)
    output = run([vulkan_tools / "test-backend-ops", "test", "-b", "Vulkan0", "-o", "MUL_MAT_ID", "-p",
                  "(n_mats=8,n_used=2,b=[01],m=64,n=(1|7|64|512),k=256)|(n_mats=4,n_used=4,b=0,m=512,n=(1|32),k=256)"])
    assert re.search(r"Device description: llvmpipe", output), output[:2000]
    cases = re.findall(r"^\s*MUL_MAT_ID\((.*?)\): (.*)$", output, re.MULTILINE)
    skipping = [(params, result) for params, result in cases if params.endswith("skip=1")]
    others = [(params, result) for params, result in cases if not params.endswith("skip=1")]
    assert len(skipping) == 6 * 4 * 2, output[-2000:]
    assert all("not supported" in result for _, result in skipping), skipping
    assert len(others) >= 20 and all(re.search(r"OK(\x1b\[0m)?$", result) for _, result in others), others
    assert "FAIL" not in output


def test_a_per_expert_file_with_odp_runs_on_lavapipe_as_on_the_cpu(vulkan_tools, converted, tmp_path):
    grouped = regroup_experts(converted("f16"), tmp_path / "grouped.gguf", {0: [0, 2], 1: [1, 3]})
    text = tmp_path / "text.txt"
    text.write_text(CALIBRATION_TEXT)
    common = [vulkan_tools / "llama-perplexity", "-m", grouped, "-f", text, "-c", "64", "-b", "64", "--chunks", "4",
              "-t", "2", "-lv", "4"]  # the loader's info lines: which buffers hold what
    odp = "mc.odp.mu_all=float:0.6,mc.odp.protect_ratio=float:0.1"
    cpu = run([*common, "--override-kv", odp, "-ngl", "0", "--device", "none"])
    vulkan = run([*common, "--override-kv", odp, "-ngl", "99"])
    unpruned = run([*common, "--override-kv", "mc.odp.enabled=bool:false", "-ngl", "0", "--device", "none"])

    def mib(output: str, buffer: str) -> float:
        # llama.cpp's load_tensors: "Vulkan0 model buffer size =     1.23 MiB"
        return sum(float(m) for m in re.findall(rf"{buffer} model buffer size = +([0-9.]+) MiB", output))

    def ppl(output: str) -> float:
        return float(re.search(r"Final estimate: PPL = ([0-9.]+)", output).group(1))

    # every layer on Vulkan but the experts, whose marked MUL_MAT_IDs Vulkan declines: they stay in CPU buffers
    import gguf

    expert_mib = sum(int(t.n_bytes) for t in gguf.GGUFReader(grouped).tensors if "_exps" in t.name) / 2**20
    assert re.search(r"offloaded (\d+)/\1 layers to GPU", vulkan), vulkan[-3000:]
    assert mib(vulkan, "Vulkan0") > 0 and mib(cpu, "Vulkan0") == 0
    assert mib(vulkan, "CPU_Mapped") >= 0.95 * expert_mib
    assert ppl(vulkan) == pytest.approx(ppl(cpu), rel=2e-3)
    assert ppl(unpruned) != pytest.approx(ppl(cpu), rel=2e-3)  # the slots were pruned
