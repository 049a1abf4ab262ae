"""Where llama.cpp puts a model's weights: its -ngl, --cpu-moe, --n-cpu-moe and -ot, as common/arg.cpp turns
them into llama_model_params (n_gpu_layers, tensor_buft_overrides).

An override pairs a regular expression with a buffer type: llama_model_loader::create_tensor searches each
pattern in a weight's name, in order, and the first that matches puts the weight in that buffer type (a CPU
override still lets the CPU repack it). The names of buffer types are those of each device's own, as
common/arg.cpp's parse_tensor_buffer_overrides lists them: "CPU", "CUDA0", "Metal", "Vulkan0",
"RPC0[HOST:PORT]".
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from functools import cache

from mc_gguf.errors import InvalidValueError

# common/common.h: LLM_FFN_EXPS_REGEX, --cpu-moe's pattern. It finds the per-expert layout's groups too
# (blk.N.ffn_gate_exps.gK.weight): their names hold ".ffn_gate_exps" before ".gK".
EXPERT_TENSORS = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
CPU_BUFFER = "CPU"  # ggml_backend_buft_name(ggml_backend_cpu_buffer_type())

# ggml-backend.h: enum ggml_backend_dev_type
_DEVICE_GPU, _DEVICE_IGPU = 1, 2
_RPC_REGISTRY = "RPC"  # ggml-rpc.cpp: the registry every RPC device names as its own


def layer_experts(layer: int) -> str:
    """--n-cpu-moe's pattern for one layer (common/common.h: llm_ffn_block_regex(layer, LLM_FFN_EXPS_REGEX)):
    blk.1. and not blk.10."""
    return rf"blk\.{layer}{EXPERT_TENSORS}"


def parse_override_tensor(text: str) -> list[tuple[str, str]]:
    """``PATTERN=BUFFER[,PATTERN=BUFFER...]`` (-ot's value) -> [(pattern, buffer type name)], split as
    common/arg.cpp's parse_tensor_buffer_overrides splits it: at commas, then at each part's first '='.

    llama.cpp compiles the patterns with std::regex (ECMAScript); Python's re reads the same syntax for what
    tensor names need (classes, groups, alternation, escapes), and refuses a broken pattern here instead of
    in the loader."""
    pairs = []
    for part in text.split(","):
        pattern, sep, buffer = part.partition("=")
        if not sep or not pattern or not buffer:
            raise InvalidValueError(f"override {part!r} is not PATTERN=BUFFER (e.g. 'exps=CPU' or 'blk\\.1\\.=CPU')")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidValueError(f"override {part!r}: {pattern!r} is not a regular expression ({exc})") from None
        pairs.append((pattern, buffer))
    return pairs


def tensor_overrides(override_tensor: Sequence[str] = (), cpu_moe: bool = False,
                     n_cpu_moe: int = 0) -> list[tuple[str, str]]:
    """The (pattern, buffer type name) list of -ot's values, then --cpu-moe's pattern, then --n-cpu-moe's one
    per layer, in that order: the first that matches a weight places it (llama.cpp keeps the order the flags
    were typed in; here an -ot always comes first, so it decides a weight that --cpu-moe would place too)."""
    if n_cpu_moe < 0:
        raise InvalidValueError(f"n_cpu_moe = {n_cpu_moe} is below 0")
    pairs = [pair for text in override_tensor for pair in parse_override_tensor(text)]
    if cpu_moe:
        pairs.append((EXPERT_TENSORS, CPU_BUFFER))
    pairs += [(layer_experts(layer), CPU_BUFFER) for layer in range(n_cpu_moe)]
    return pairs


def resolve(overrides: Sequence[tuple[str, str]]) -> list[tuple[str, int]]:
    """(pattern, buffer type name) -> (pattern, ggml_backend_buffer_type_t), by the names of this process's
    devices (RPC servers count once added: rpc.add_servers); an unknown name is an error listing the known."""
    known = buffer_types()
    resolved = []
    for pattern, name in overrides:
        if name not in known:
            raise InvalidValueError(f"override {pattern}={name}: there is no buffer type {name!r}; this "
                                    f"process's devices have {', '.join(known)}")
        resolved.append((pattern, known[name]))
    return resolved


def buffer_types() -> dict[str, int]:
    """Every device's buffer type by name (common/arg.cpp's buft_list). An RPC server that this process reaches
    through a relay (runtime/relay.py) is named by its own address, as the user gave it."""
    from mc_gguf.runtime.rpc import _routes

    lib = _ggml()
    found = {}
    for index in range(lib.ggml_backend_dev_count()):
        buft = lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_get(index))
        if buft:
            name = lib.ggml_backend_buft_name(buft).decode()
            for endpoint, address in _routes.items():
                name = name.replace(f"[{address}]", f"[{endpoint}]")
            found[name] = buft
    return found


def gpu_offload() -> bool:
    """Whether the runtime has a GPU of its own (a CUDA, Metal or Vulkan device): llama_supports_gpu_offload
    without its RPC clause, which every runtime built with GGML_RPC meets."""
    lib = _ggml()
    for index in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(index)
        if lib.ggml_backend_dev_type(device) in (_DEVICE_GPU, _DEVICE_IGPU) and \
                lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(device)).decode() != _RPC_REGISTRY:
            return True
    return False


@cache
def _ggml() -> ctypes.CDLL:
    """ggml's device registry, through libllama's handle (dlsym searches the libraries it loaded: the very
    libggml llama.cpp uses)."""
    import llama_cpp.llama_cpp as bindings

    lib = bindings._lib
    for name, restype, argtypes in (
            ("ggml_backend_reg_count", ctypes.c_size_t, []),
            ("ggml_backend_load_all", None, []),
            ("ggml_backend_dev_count", ctypes.c_size_t, []),
            ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
            ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
            ("ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
            ("ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
            ("ggml_backend_dev_buffer_type", ctypes.c_void_p, [ctypes.c_void_p]),
            ("ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p])):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    if not lib.ggml_backend_reg_count():  # as llama_supports_gpu_offload: backends built as modules load now
        lib.ggml_backend_load_all()
    return lib
