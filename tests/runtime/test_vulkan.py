"""The patched ggml on Vulkan, run on Mesa's software driver (lavapipe): ``make test-vulkan``, not ``make test``.

Vulkan is not one of the backends that skip -1 expert ids (its registry does not list MUL_MAT_ID_SKIP, patch
0002): ggml-vulkan reads a -1 id as an expert index. On lavapipe:

- test-backend-ops runs MUL_MAT_ID on Vulkan against the CPU, and declines its cases with skipped slots,
  which are marked as llama.cpp's graph marks them (0002), rather than run them with -1 ids;
- llama-perplexity with every layer offloaded to Vulkan runs a per-expert file with ODP as it runs on the CPU
  alone: the loader keeps the experts in CPU buffers and the scheduler runs their marked MUL_MAT_IDs there,
  while the rest of the model is on the Vulkan device;
- mc-gguf's own loader on a runtime built `runtime build --vulkan` puts the weights where llama.cpp's -ngl,
  --cpu-moe, --n-cpu-moe and -ot say (Vulkan standing for the users' GPU, as the RPC server does in
  tests/evaluate/test_llama_flags.py), at the CPU's greedy text.

The tools are built once from the patched tree with -DGGML_VULKAN=ON (runtime/stock.tools_dir); the Vulkan
runtime is the patched wheel built with it, unpacked into a folder of the cache that the clients put first on
their PYTHONPATH (the project's environment keeps its CPU runtime).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mc_gguf.gguf_io.regroup import regroup_experts
from mc_gguf.gguf_io.header import scan

from conftest import CALIBRATION_TEXT
from helpers import placements

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

    # the fused op of experts in groups (0005) is the CPU's alone: Vulkan declines every case of it
    output = run([vulkan_tools / "test-backend-ops", "test", "-b", "Vulkan0", "-o", "MUL_MAT_ID_GROUPS"])
    groups = re.findall(r"^\s*MUL_MAT_ID_GROUPS\((.*?)\): (.*)$", output, re.MULTILINE)
    assert len(groups) == 3 * 2 * 2 and all("not supported" in result for _, result in groups), output[-2000:]


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


@pytest.fixture(scope="module")
def vulkan_runtime() -> dict:
    """The environment of a client that imports the patched runtime built with Vulkan (the wheel of
    `mc-gguf runtime build --vulkan`, cached, unpacked into the cache rather than installed)."""
    import sys

    from mc_gguf.runtime.build import cached_or_built_wheel
    from mc_gguf.runtime.source import BuildFlags, CacheLock, build_key, cache_root

    if shutil.which("glslc") is None:
        pytest.fail("glslc is not installed: run make test-vulkan, which installs what Vulkan needs")
    flags = BuildFlags(vulkan=True)
    cache = cache_root()
    site = cache / "site" / build_key(flags)
    with CacheLock(cache):
        if not (site / "llama_cpp").is_dir():
            wheel = cached_or_built_wheel(cache, flags, force=False)
            staged = site.with_name(site.name + ".partial")
            shutil.rmtree(staged, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                            "--target", str(staged), str(wheel)], check=True)
            staged.rename(site)
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_placement_flags_put_the_tensors_where_llama_cpp_would_on_vulkan(vulkan_runtime, converted, tmp_path):
    """-ngl, --cpu-moe, --n-cpu-moe and -ot through mc_gguf.load on Vulkan (lavapipe), read from the loader's
    buffers against the file's tensor bytes, on a stock-layout file without pruning keys: its MUL_MAT_IDs are
    unmarked, so Vulkan takes the experts like any layer's weights. Weights kept in host memory are in "CPU"
    or, read without mmap, in the Vulkan device's pinned "Vulkan_Host" buffer (llama.cpp's load_tensors).
    Every placement gives the CPU's greedy text."""
    path = converted("f16")
    mib = tensor_mib(path)
    total, embedding, experts = mib(lambda name: True), mib(is_embedding), mib(is_expert)
    cases = {
        "-ngl 0": ({"n_gpu_layers": 0}, total),
        "default: every layer on a GPU runtime": ({}, embedding),
        "-ngl 99": ({"n_gpu_layers": 99}, embedding),
        "--cpu-moe": ({"n_gpu_layers": 99, "cpu_moe": True}, embedding + experts),
        "--n-cpu-moe 1": ({"n_gpu_layers": 99, "n_cpu_moe": 1},
                          embedding + mib(lambda name: name.startswith("blk.0.") and is_expert(name))),
        "-ot blk.1=CPU": ({"n_gpu_layers": 99, "override_tensor": [r"blk\.1\.=CPU"]},
                          embedding + mib(lambda name: name.startswith("blk.1."))),
        "-ngl 0 -ot exps=Vulkan0": ({"n_gpu_layers": 0, "override_tensor": ["exps=Vulkan0"]}, total - experts),
    }
    check_placements(path, cases, vulkan_runtime, total)
    assert experts > 0.1 * total


def test_experts_vulkan_cannot_skip_stay_in_host_memory(vulkan_runtime, converted, tmp_path):
    """Vulkan declines MUL_MAT_IDs whose ids may be -1 (patch 0002): the experts of a file with pruning keys, and
    a per-expert file's groups, stay in host memory with -ngl 99 while the rest goes to the device (the
    scheduler runs their ops on the CPU); an -ot naming the device still puts them there, as llama.cpp does."""
    from mc_gguf.gguf_io import keys
    from mc_gguf.gguf_io.edit import rewrite_metadata

    stock = converted("f16")
    pruned = rewrite_metadata(stock, tmp_path / "pruned.gguf", {keys.ODP_MU: keys.details(keys.ODP_MU, [0.6, 0.6])})
    grouped = regroup_experts(stock, tmp_path / "grouped.gguf", {0: [0, 2], 1: [1, 3]})
    for path in (pruned, grouped):
        mib = tensor_mib(path)
        total, embedding, experts = mib(lambda name: True), mib(is_embedding), mib(is_expert)
        cases = {
            "-ngl 0": ({"n_gpu_layers": 0}, total),
            "-ngl 99": ({"n_gpu_layers": 99}, embedding + experts),
            "-ngl 99 -ot blk.1=CPU": ({"n_gpu_layers": 99, "override_tensor": [r"blk\.1\.=CPU"]},
                                      embedding + experts + mib(lambda name: name.startswith("blk.1."))
                                      - mib(lambda name: name.startswith("blk.1.") and is_expert(name))),
            "-ngl 0 -ot exps=Vulkan0": ({"n_gpu_layers": 0, "override_tensor": ["exps=Vulkan0"]}, total - experts),
        }
        check_placements(path, cases, vulkan_runtime, total)


def is_embedding(name: str) -> bool:
    return name.startswith("token_embd.")  # the input layer stays in host memory


def is_expert(name: str) -> bool:
    return "_exps." in name


def tensor_mib(path):
    """keep -> the MiB of the file's tensors whose names ``keep`` selects: the reference for a buffer's size."""
    header = scan(path)
    return lambda keep: sum(t.nbytes for t in header.tensors if keep(t.name)) / 2**20


def check_placements(path, cases: dict, env: dict, total: float) -> None:
    """Each case's (load() keywords, MiB expected in host memory): host and Vulkan0 buffers as expected, and the
    greedy text of the first case (-ngl 0)."""
    results = dict(zip(cases, placements(path, "The router chooses", [kwargs for kwargs, _ in cases.values()],
                                         env=env)))
    reference = results[next(iter(cases))]["text"]
    for case, (_, host_mib) in cases.items():
        buffers = results[case]["buffers"]
        assert set(buffers) <= {"CPU", "Vulkan_Host", "Vulkan0"}, (path.name, case, buffers)
        host = buffers.get("CPU", 0.0) + buffers.get("Vulkan_Host", 0.0)
        assert host == pytest.approx(host_mib, abs=0.02), (path.name, case, buffers)
        assert buffers.get("Vulkan0", 0.0) == pytest.approx(total - host_mib, abs=0.02), (path.name, case, buffers)
        assert results[case]["text"] == reference, (path.name, case, results[case]["text"])
