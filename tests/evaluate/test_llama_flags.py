"""llama.cpp's flags on run, chat and eval: parsed as llama.cpp spells them, and doing what llama.cpp does.

Placement is read from the loader's own report (llama.cpp's "<BUFFER> model buffer size = N MiB" lines, kept
as ``llm.model_buffers``) and checked against the bytes of the matching tensors in the GGUF, read by
gguf_io.header.scan. A local `mc-gguf runtime rpc-server` stands in for a GPU: with -ngl the layers go to
its buffer ("RPC0[HOST:PORT]"), and the flags that keep tensors on the CPU take them out of it. The clients run
in child processes (as tests/runtime/test_rpc.py's): a registered RPC device stays in its process, and the
weights are read into memory (no mmap), so that a CPU buffer's size is its tensors' bytes rather than the span
of the file it maps.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from mc_gguf.cli import build_parser, main
from mc_gguf.cli.common import llama_load_kwargs
from mc_gguf.gguf_io.header import scan
from mc_gguf.gguf_io.regroup import regroup_experts
from mc_gguf.runtime.rpc import RpcError, server_version

from helpers import placements

PROMPT = "The router chooses"
MIB = 2**20

# ------------------------------------------------------------------ parsing


def parsed(*argv: str):
    return build_parser().parse_args(list(argv))


def test_ngl_zero_is_no_layer_on_the_gpu_not_dash_n():
    args = parsed("run", "m.gguf", "-p", "hi", "-ngl", "0")
    assert args.n_gpu_layers == 0 and args.max_tokens == 32
    assert parsed("run", "m.gguf", "-p", "hi", "-ngl", "99").n_gpu_layers == 99
    assert parsed("run", "m.gguf", "-p", "hi", "-ngl", "all").n_gpu_layers == -1
    assert parsed("run", "m.gguf", "-p", "hi").n_gpu_layers is None  # load() decides: GPU build or --rpc


@pytest.mark.parametrize("command", [["run", "-p", "hi"], ["chat"], ["eval", "--text", "t.txt"]])
def test_ctx_size_and_ctx_are_one_flag(command):
    for flag in ("-c", "--ctx-size", "--ctx"):
        assert parsed(*command, "m.gguf", flag, "128").ctx == 128


def test_eval_ctx_size_is_the_window_length():
    assert parsed("eval", "m.gguf", "--text", "t.txt").ctx == 512
    args = parsed("eval", "m.gguf", "--text", "t.txt", "-c", "64")
    assert llama_load_kwargs(args)["n_ctx"] == 64


def test_model_as_dash_m_or_first_argument():
    assert parsed("run", "-m", "m.gguf", "-p", "hi").model == "m.gguf"
    assert parsed("run", "-p", "hi", "m.gguf").model == "m.gguf"
    assert parsed("eval", "--model", "m.gguf", "--text", "t.txt").model == "m.gguf"


@pytest.mark.parametrize("argv, message", [
    (["run", "-p", "hi"], "one of the arguments model -m/--model is required"),
    (["run", "a.gguf", "-m", "b.gguf", "-p", "hi"], "not allowed with argument model"),
])
def test_model_once_and_only_once(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_llama_spellings_of_length_threads_and_sampling():
    args = parsed("run", "m.gguf", "-p", "hi", "-n", "7", "-t", "1", "-tb", "2", "--temp", "0.5", "--top-k", "3",
                  "--top-p", "0.5", "--min-p", "0.1", "--repeat-penalty", "1.2", "-s", "9")
    assert (args.max_tokens, args.threads, args.threads_batch, args.seed) == (7, 1, 2, 9)
    assert (args.temperature, args.top_k, args.top_p, args.min_p, args.repeat_penalty) == (0.5, 3, 0.5, 0.1, 1.2)
    for flag in ("--n-predict", "--max-tokens"):
        assert parsed("chat", "m.gguf", flag, "5").max_tokens == 5
    assert parsed("chat", "m.gguf", "--temperature", "0", "--seed", "4").seed == 4


def test_override_tensor_is_repeatable_and_checked(capsys):
    args = parsed("run", "m.gguf", "-p", "hi", "-ot", r"blk\.1\.=CPU", "-ot", "exps=CPU,output=CPU", "--cpu-moe",
                  "--n-cpu-moe", "1")
    kwargs = llama_load_kwargs(args)
    assert kwargs["override_tensor"] == (r"blk\.1\.=CPU", "exps=CPU,output=CPU")
    assert kwargs["cpu_moe"] and kwargs["n_cpu_moe"] == 1
    for bad, message in (("exps", "is not PATTERN=BUFFER"), ("blk(=CPU", "is not a regular expression")):
        assert main(["run", "m.gguf", "-p", "hi", "-ot", bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["run", "-p", "hi"], ["chat"], ["eval", "--text", "t.txt"]])
def test_a_bad_flag_shows_the_commands_usage(capsys, command):
    assert main([command[0], "m.gguf", *command[1:], "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: mc-gguf {command[0]} ")
    assert f"mc-gguf {command[0]}: error: unrecognized arguments: --bogus" in err


def test_the_cpu_moe_pattern_finds_the_per_expert_groups():
    """llama.cpp's pattern (common.h: LLM_FFN_EXPS_REGEX), searched as its loader searches (std::regex_search)."""
    from mc_gguf.runtime.placement import EXPERT_TENSORS, layer_experts

    for name in ("blk.3.ffn_gate_exps.weight", "blk.3.ffn_down_exps.g0.weight", "blk.3.ffn_up_exps.g12.weight"):
        assert re.search(EXPERT_TENSORS, name) and re.search(layer_experts(3), name)
    for name in ("blk.3.ffn_gate_inp.weight", "blk.3.ffn_up.weight", "blk.3.attn_q.weight"):
        assert not re.search(EXPERT_TENSORS, name)
    assert not re.search(layer_experts(1), "blk.10.ffn_up_exps.weight")


# ------------------------------------------------------------------ placement, on an RPC server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_server():
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mc_gguf.cli", "runtime", "rpc-server", "--port", str(port),
                               "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            server_version(endpoint, timeout=2)
            break
        except RpcError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise AssertionError(f"no RPC server at {endpoint}: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def grouped(converted, tmp_path_factory):
    """The tiny model with its experts in the per-expert layout's groups (blk.N.ffn_*_exps.gK.weight)."""
    return regroup_experts(converted("f16"), tmp_path_factory.mktemp("flags") / "grouped.gguf",
                           {0: [0, 2], 1: [1, 3]})


def mib(header, keep) -> float:
    """The MiB of the file's tensors that ``keep(name)`` selects: the reference for a buffer's size."""
    return sum(t.nbytes for t in header.tensors if keep(t.name)) / MIB


def on_cpu(buffers: dict) -> float:
    return buffers.get("CPU", 0.0)


def on_server(buffers: dict, endpoint: str) -> float:
    return sum(size for name, size in buffers.items() if name.startswith("RPC") and name.endswith(f"[{endpoint}]"))


def test_placement_flags_put_the_tensors_where_llama_cpp_would(grouped, rpc_server):
    header = scan(grouped)
    total = mib(header, lambda name: True)
    embedding = mib(header, lambda name: name.startswith("token_embd."))  # the input layer stays on the CPU
    experts = mib(header, lambda name: "_exps." in name)
    assert len([t for t in header.tensors if ".g1." in t.name]) == 6  # the groups are what --cpu-moe must find
    server = [rpc_server]
    cases = {
        "cpu only": ({}, total),
        "-ngl 99": ({"rpc": server, "n_gpu_layers": 99}, embedding),
        "--rpc alone: every layer": ({"rpc": server}, embedding),
        "-ngl 0": ({"rpc": server, "n_gpu_layers": 0}, total),
        "--cpu-moe": ({"rpc": server, "n_gpu_layers": 99, "cpu_moe": True}, embedding + experts),
        "--n-cpu-moe 1": ({"rpc": server, "n_gpu_layers": 99, "n_cpu_moe": 1},
                          embedding + mib(header, lambda name: name.startswith("blk.0.") and "_exps." in name)),
        "-ot blk.1=CPU": ({"rpc": server, "n_gpu_layers": 99, "override_tensor": [r"blk\.1\.=CPU"]},
                          embedding + mib(header, lambda name: name.startswith("blk.1."))),
        "-ngl 0 -ot exps=RPC": ({"rpc": server, "n_gpu_layers": 0, "override_tensor": [f"exps=RPC0[{rpc_server}]"]},
                                total - experts),
    }
    results = dict(zip(cases, placements(grouped, PROMPT, [kwargs for kwargs, _ in cases.values()])))
    for case, (_, cpu_mib) in cases.items():
        buffers = results[case]["buffers"]
        assert on_cpu(buffers) == pytest.approx(cpu_mib, abs=0.02), (case, buffers)
        assert on_server(buffers, rpc_server) == pytest.approx(total - cpu_mib, abs=0.02), (case, buffers)
        assert set(buffers) <= {"CPU", f"RPC0[{rpc_server}]"}, (case, buffers)
        # greedy text is the same wherever the tensors are (the server runs ggml's same CPU code)
        assert results[case]["text"] == results["cpu only"]["text"], case
    assert experts > 0.1 * total


def test_an_unknown_buffer_type_is_refused_with_the_known_ones(converted, capsys):
    assert main(["run", str(converted("f16")), "-p", PROMPT, "-n", "2", "-ot", "exps=CUDA7"]) == 1
    err = capsys.readouterr().err
    assert "there is no buffer type 'CUDA7'" in err and "devices have CPU" in err and "this is a bug" not in err


# ------------------------------------------------------------------ threads and sampling, through the commands


def run_text(capsys, path, *flags: str) -> str:
    assert main(["run", str(path), "-p", PROMPT, "-n", "16", *flags]) == 0
    return capsys.readouterr().out


def test_threads_and_sampling_flags_reach_the_runtime(converted, capsys):
    path = converted("f16")
    greedy = run_text(capsys, path)
    assert run_text(capsys, path, "-t", "1", "-tb", "1") == greedy
    assert run_text(capsys, path, "--temp", "0") == greedy
    sampled = run_text(capsys, path, "--temp", "1.5", "--min-p", "0", "--top-p", "1", "--top-k", "0", "-s", "3")
    assert sampled != greedy  # the temperature is used...
    assert run_text(capsys, path, "--temp", "1.5", "--min-p", "0", "--top-p", "1", "-s", "3", "--top-k", "0") == sampled
    assert run_text(capsys, path, "--temp", "1.5", "--top-k", "1", "-s", "3") == greedy  # ...and so is top-k
    assert run_text(capsys, path, "--repeat-penalty", "5") != greedy  # penalties apply to greedy decoding too


def test_chat_takes_the_sampling_flags(converted):
    def reply(*flags: str) -> str:
        result = subprocess.run([sys.executable, "-m", "mc_gguf.cli", "chat", str(converted("f16")), "-c", "256",
                                 "-n", "8", *flags], input=b"Hello there\n", capture_output=True, timeout=300,
                                check=False)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        return result.stdout.decode()

    assert reply("--temp", "1.5", "--top-k", "1", "-s", "5") == reply("--temp", "0")


def test_eval_takes_ctx_size_threads_and_placement(converted, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The router chooses the experts of each token, and the others rest. " * 40)

    def report(*flags: str) -> dict:
        assert main(["eval", str(converted("f16")), "--text", str(text), "--chunks", "2", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    plain = report("--ctx", "64")
    flagged = report("-c", "64", "-t", "1", "--cpu-moe", "-ngl", "0")
    assert flagged["settings"]["n_ctx"] == plain["settings"]["n_ctx"] == 64
    assert flagged["settings"]["cpu_moe"] and flagged["settings"]["n_threads"] == 1
    assert flagged["ppl"] == pytest.approx(plain["ppl"], rel=1e-6)
