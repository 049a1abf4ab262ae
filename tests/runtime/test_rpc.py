"""The patched runtime over ggml's RPC backend, on localhost.

A patched server (`mc-gguf runtime rpc-server`) runs every layer of a
per-expert file with ODP: the logits and slot counters are the CPU's alone,
bit for bit. With the RPC registry declaring that it does not skip -1 expert
ids (GGML_RPC_MUL_MAT_ID_SKIP=0, patch 0005), the server is given the rest of
the model but not the experts, whose marked MUL_MAT_IDs the CPU runs; a stock file's
are not marked and stay on the server. A stock server (the unpatched build of the same sdist, serving with
its own libggml-rpc) is refused with a clear error before llama.cpp connects,
never sent -1 expert ids. The clients run in child processes: a registered
RPC device stays in its process, and a server that goes away would abort it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mc_gguf.gguf_io.regroup import regroup_experts
from mc_gguf.runtime.rpc import PROTOCOL_MAJOR, RpcError, check_server, server_version

from helpers import PROMPT

CLIENT = """
import json, re, sys
import numpy as np
from mc_gguf.loader.model import load
path, ids, out, kwargs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
llm = load(path, n_ctx=512, logits_all=True, **kwargs)
llm.eval(ids)
counts = llm.expert_stats()
# llama.cpp's load_tensors: "RPC0[127.0.0.1:PORT] model buffer size =     9.51 MiB"
rpc_mib = sum(float(m.group(1)) for line in llm.load_log
              for m in [re.search(r"RPC\\d+\\[.*\\] model buffer size = +([0-9.]+) MiB", line)] if m)
np.savez(out, logits=np.array(llm.scores[:len(ids)], dtype=np.float32), computed=counts.computed,
         skipped=counts.skipped, rpc_mib=rpc_mib)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], endpoint: str) -> subprocess.Popen:
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            server_version(endpoint, timeout=2)
            return server
        except RpcError:
            if server.poll() is not None:
                raise AssertionError(f"the server exited: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.2)
    server.kill()
    raise AssertionError(f"no RPC server at {endpoint} after 60 s")


@pytest.fixture(scope="module")
def patched_server():
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    server = start_server([sys.executable, "-m", "mc_gguf.cli", "runtime", "rpc-server", "--port", str(port),
                           "--threads", "2"], endpoint)
    yield endpoint
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def stock_server():
    from mc_gguf.runtime.stock import stock_library_dir

    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    code = (f"from pathlib import Path; from mc_gguf.runtime.rpc import serve; "
            f"serve('127.0.0.1', {port}, 1, lib_dir=Path({str(stock_library_dir())!r}))")
    server = start_server([sys.executable, "-c", code], endpoint)
    yield endpoint
    server.terminate()
    server.wait(10)


def run_client(path: Path, ids: list[int], out: Path, env: dict | None = None, **kwargs) -> dict:
    result = subprocess.run([sys.executable, "-c", CLIENT, str(path), json.dumps(ids), str(out), json.dumps(kwargs)],
                            capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out))


def test_the_patched_server_speaks_the_series_protocol(patched_server):
    from mc_gguf.runtime.source import patched_source

    header = (patched_source() / "ggml" / "include" / "ggml-rpc.h").read_text()
    assert f"#define RPC_PROTO_MAJOR_VERSION    {PROTOCOL_MAJOR}" in header
    assert server_version(patched_server)[0] == PROTOCOL_MAJOR
    check_server(patched_server)


@pytest.mark.parametrize("settings", [{"mu": 0.6, "protect_ratio": 0.1, "n_batch": 512},
                                      {"mu": 0.6, "protect_ratio": 0.0, "n_batch": 1}], ids=str)
def test_a_per_expert_file_with_odp_runs_on_the_server_as_on_the_cpu(patched_server, converted, hf_tokenizer,
                                                                     tmp_path, settings):
    grouped = regroup_experts(converted("f16"), tmp_path / "grouped.gguf", {0: [0, 2], 1: [1, 3]})
    ids = hf_tokenizer(PROMPT).input_ids
    cpu = run_client(grouped, ids, tmp_path / "cpu.npz", **settings)
    remote = run_client(grouped, ids, tmp_path / "rpc.npz", rpc=[patched_server], **settings)
    np.testing.assert_array_equal(remote["computed"], cpu["computed"])
    np.testing.assert_array_equal(remote["skipped"], cpu["skipped"])
    assert cpu["skipped"].sum() > 0
    # every layer on the server (llama.cpp: "layer N assigned to device RPC0"), which runs ggml's same CPU code
    np.testing.assert_array_equal(remote["logits"], cpu["logits"])
    assert remote["rpc_mib"] > 0 and cpu["rpc_mib"] == 0

    # a backend that cannot skip -1 ids (here RPC, its MUL_MAT_ID_SKIP feature set to 0): the loader keeps the
    # experts in CPU buffers and the scheduler runs their marked MUL_MAT_IDs on the CPU; the rest stays on the server
    fallback = run_client(grouped, ids, tmp_path / "fallback.npz", env={"GGML_RPC_MUL_MAT_ID_SKIP": "0"},
                          rpc=[patched_server], **settings)
    np.testing.assert_array_equal(fallback["computed"], cpu["computed"])
    np.testing.assert_array_equal(fallback["skipped"], cpu["skipped"])
    np.testing.assert_array_equal(fallback["logits"], cpu["logits"])
    import gguf

    expert_mib = sum(int(t.n_bytes) for t in gguf.GGUFReader(grouped).tensors if "_exps" in t.name) / 2**20
    assert fallback["rpc_mib"] > 0
    assert remote["rpc_mib"] - fallback["rpc_mib"] == pytest.approx(expert_mib, rel=0.05)


def test_a_stock_files_expert_ops_are_not_marked(patched_server, converted, hf_tokenizer, tmp_path):
    """No ODP, no groups: no MUL_MAT_ID is marked, so even a backend that cannot skip holds the experts and
    runs them (and CUDA's launchers skip their memset: the same ggml_mul_mat_id_may_skip test)."""
    ids = hf_tokenizer(PROMPT).input_ids
    stock = converted("f16")
    cpu = run_client(stock, ids, tmp_path / "cpu.npz")
    declined = run_client(stock, ids, tmp_path / "declined.npz", env={"GGML_RPC_MUL_MAT_ID_SKIP": "0"},
                          rpc=[patched_server])
    allowed = run_client(stock, ids, tmp_path / "allowed.npz", rpc=[patched_server])
    assert declined["rpc_mib"] == allowed["rpc_mib"] > 0
    np.testing.assert_array_equal(declined["logits"], cpu["logits"])


def test_a_stock_server_is_refused_with_a_clear_error(stock_server, converted, tmp_path):
    major = server_version(stock_server)[0]
    assert major != PROTOCOL_MAJOR
    with pytest.raises(RpcError, match="stock llama.cpp rpc-server"):
        check_server(stock_server)
    result = subprocess.run([sys.executable, "-m", "mc_gguf.cli", "run", str(converted("f16")), "-p", "Hello",
                             "-n", "2", "--rpc", stock_server], capture_output=True, text=True)
    assert result.returncode != 0
    assert "stock llama.cpp rpc-server" in result.stderr and "Traceback" not in result.stderr


def test_rpc_server_that_cannot_listen_fails_with_a_clear_error():
    """A port in use, a port out of range, a host with a port in it, an unknown host: one line, a non-zero exit,
    never ggml-rpc's "Failed to create server socket" and exit 0."""
    mc = str(Path(sys.executable).parent / "mc-gguf")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cases = {("--port", str(port)): "cannot listen on 127.0.0.1:",
                 ("--port", "70000"): "not a TCP port",
                 ("--host", "127.0.0.1:9"): "the port goes in --port",
                 ("--host", "no-such-host.invalid"): "unknown host"}
        for args, message in cases.items():
            result = subprocess.run([mc, "runtime", "rpc-server", *args], capture_output=True, text=True, timeout=60,
                                    check=False)
            assert result.returncode != 0, (args, result.stdout, result.stderr)
            assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
