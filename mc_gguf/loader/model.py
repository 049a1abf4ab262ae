"""The patched runtime's loader: a GGUF checked and loaded into llama-cpp-python's ``Llama`` with Online Dynamic
Pruning, per-expert files, placement (llama.cpp's -ngl, --cpu-moe, -ot, --rpc) and the slot counters.

The file is checked first as llama.cpp's loader would refuse it (gguf_io/validate.py), its ``mc.odp.*`` and
``mc.experts.groups`` keys read and validated as the patches read them (llama-model.cpp's load_hparams), and
its required patch level compared with the installed runtime's; llama.cpp's own log while loading is kept for
the reason of a refusal and the buffers the weights went to (load_tensors' "model buffer size" lines).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import gguf

from mc_gguf.errors import GGUFFileError, InvalidValueError
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.edit import field_value, open_gguf
from mc_gguf.gguf_io.requirements import needed_patch_level
from mc_gguf.gguf_io.validate import check_model
from mc_gguf.prune import rule as pruning

# the KV cache default: the model's own context, capped (a 32k-token cache is rarely wanted on a laptop)
DEFAULT_MAX_CONTEXT = 4096
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"  # and tokenizer.chat_template.NAME for named ones


def context_length(reader: gguf.GGUFReader) -> int | None:
    """The context length the model was trained with, from the GGUF metadata."""
    arch = field_value(reader, "general.architecture")
    value = field_value(reader, f"{arch}.context_length")
    return int(value) if value is not None else None


def odp_metadata(reader: gguf.GGUFReader) -> pruning.OdpParams | None:
    """The file's ODP parameters (validated as the runtime will), or None when it has none."""
    arch = field_value(reader, "general.architecture")
    n_layers = field_value(reader, f"{arch}.block_count")
    mu = keys.read(reader, keys.ODP_MU)
    if mu is None:
        return None
    exps = keys.read(reader, keys.ODP_MU_EXPS)
    n_experts = int(field_value(reader, f"{arch}.expert_count") or 0)
    mu_exps = None
    if exps is not None:
        flat = [float(v) for v in exps]
        if not n_experts or len(flat) != len(mu) * n_experts:
            raise GGUFFileError(f"{keys.ODP_MU_EXPS} has {len(flat)} values but the model has {n_layers} layers "
                                f"of {n_experts} experts")
        mu_exps = [flat[first:first + n_experts] for first in range(0, len(flat), n_experts)]
    keys.read(reader, keys.ODP_MU_ALL)  # load-time overrides: only their types are checked here
    keys.read(reader, keys.ODP_ENABLED)
    renormalize = keys.read(reader, keys.ODP_RENORMALIZE)
    rho = keys.read(reader, keys.ODP_PROTECT_RATIO)
    rho = pruning.DEFAULT_PROTECT_RATIO if rho is None else float(rho)
    mu = [float(v) for v in mu]
    pruning.validate_params(mu, rho, n_layers, mu_exps, n_experts)
    return pruning.OdpParams(mu, rho, mu_exps, True if renormalize is None else bool(renormalize))


def read_odp_metadata(path: str | Path, reader: gguf.GGUFReader | None = None) -> pruning.OdpParams | None:
    """``odp_metadata`` of the file at ``path`` (read unless ``reader`` is given); errors name the file."""
    try:
        return odp_metadata(reader if reader is not None else open_gguf(path))
    except GGUFFileError as exc:
        raise GGUFFileError(f"{path}: {exc}") from None


def check_expert_groups(path: str | Path, reader: gguf.GGUFReader) -> None:
    """The per-expert layout's rules (docs/FORMAT.md), checked before llama.cpp loads the file."""
    from mc_gguf.gguf_io.layout import group_map_problem, is_expert_weight

    try:
        group_map = keys.read(reader, keys.EXPERT_GROUPS)
    except GGUFFileError as exc:
        raise GGUFFileError(f"{path}: {exc}") from None
    if group_map is None:
        return
    arch = field_value(reader, "general.architecture")
    counts = {t.name: int(t.shape[-1]) for t in reader.tensors if is_expert_weight(t.name)}
    problem = group_map_problem(group_map, counts, int(field_value(reader, f"{arch}.block_count")),
                                int(field_value(reader, f"{arch}.expert_count") or 0),
                                int(field_value(reader, f"{arch}.leading_dense_block_count") or 0))
    if problem:
        raise GGUFFileError(f"{path}: {problem}")


class _BuftOverride(ctypes.Structure):
    """llama.h: struct llama_model_tensor_buft_override (llama-cpp-python declares the field as a void *)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@cache
def _moe_llama_class(repack: bool = True):
    """llama_cpp.Llama with the patched runtime's slot counters; it sets the llama_model_params fields its
    constructor does not take: ``repack=False`` clears use_extra_bufts (llama.cpp's --no-repack), and the
    ``tensor_buft_overrides`` keyword, [(pattern, ggml_backend_buffer_type_t)] (runtime/placement.py), becomes
    the NULL-terminated array llama.cpp's -ot builds (common.cpp: common_model_params_to_llama)."""
    import llama_cpp.llama_cpp as bindings
    from llama_cpp import Llama

    stats = bindings._lib.llama_mc_expert_stats
    stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64), ctypes.c_int32]
    stats.restype = ctypes.c_int32
    reset = bindings._lib.llama_mc_expert_stats_reset
    reset.argtypes = [ctypes.c_void_p]
    reset.restype = None

    class MoELlama(Llama):
        """A ``llama_cpp.Llama`` that reports how many expert slots ran and how many were pruned."""

        def __init__(self, *args, tensor_buft_overrides: Sequence[tuple[str, int]] = (), **kwargs):
            self._mc_overrides = list(tensor_buft_overrides)
            super().__init__(*args, **kwargs)

        @property
        def model_params(self):
            return self._mc_model_params

        @model_params.setter
        def model_params(self, params) -> None:  # Llama.__init__ assigns llama_model_default_params() once
            params.use_extra_bufts = params.use_extra_bufts and repack
            if self._mc_overrides:
                # kept on the object: llama.cpp reads the patterns while it loads
                self._mc_override_array = (_BuftOverride * (len(self._mc_overrides) + 1))(
                    *(_BuftOverride(pattern.encode(), buft) for pattern, buft in self._mc_overrides))
                params.tensor_buft_overrides = ctypes.addressof(self._mc_override_array)
            self._mc_model_params = params

        @property
        def metadata(self) -> dict[str, str]:
            return self._mc_metadata

        @metadata.setter
        def metadata(self, values: dict[str, str]) -> None:
            # Llama.__init__ assigns the file's metadata, then compiles every chat template in it and fails on a
            # broken one: those are kept out (and their reasons kept for chat_formatter), so that run, which
            # needs no template, still works
            self._mc_metadata, self.chat_template_problems = _usable_chat_templates(values)

        def expert_stats(self) -> pruning.SlotCounts:
            n_layer = stats(self.ctx, None, None, 0)
            computed = (ctypes.c_int64 * n_layer)()
            skipped = (ctypes.c_int64 * n_layer)()
            stats(self.ctx, computed, skipped, n_layer)
            return pruning.SlotCounts(list(computed), list(skipped))

        def reset_expert_stats(self) -> None:
            reset(self.ctx)

        def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
            return tokenize(self._model.vocab, text, add_bos, special)

    return MoELlama


def tokenize(vocab, text: bytes, add_bos: bool, special: bool) -> list[int]:
    """llama_tokenize into a buffer sized by the text, then by the count llama.cpp asks for: llama-cpp-python's
    own (_internals.LlamaModel.tokenize) holds the model's training context, llama_model_n_ctx_train tokens,
    which a file's context_length makes 8 GB (2^31 - 1), or negative (an int32 from 2^31 on)."""
    import llama_cpp

    room = len(text) + 2
    for _ in range(2):
        tokens = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), tokens, room, add_bos, special)
        if n >= 0:
            return tokens[:n]
        if n == -2 ** 31:  # llama.h: INT32_MIN when the tokens would outnumber an int32
            break
        room = -n
    raise InvalidValueError(f"llama.cpp cannot tokenize this text of {len(text)} bytes")


def load(path: str | Path, *, odp: bool = True, mu: float | None = None,
         protect_ratio: float | None = None, rpc: Sequence[str] = (), repack: bool = True,
         n_gpu_layers: int | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
         override_tensor: Sequence[str] = (), **llama_kwargs):
    """A llama_cpp ``Llama`` (with ``expert_stats()``) for ``path`` on the patched runtime.

    ODP follows the file's ``mc.odp.*`` metadata; ``mu`` sets one threshold for every
    layer, ``protect_ratio`` the share of prompt tokens that keep all experts, and
    ``odp=False`` turns pruning off. A stock GGUF runs unpruned. ``rpc``: patched
    rpc-servers (``HOST:PORT``, see runtime/rpc.py) to offload layers to, as llama.cpp's
    ``--rpc``. ``repack=False`` is llama.cpp's
    ``--no-repack``: the CPU backend computes from the mapped file instead of copying
    the weights it has faster kernels for (Q4_K, Q8_0, ...) into its own layout, so a
    model larger than memory stays pages the kernel can drop; prompts run slower.

    Placement, as llama.cpp's flags (runtime/placement.py): ``n_gpu_layers`` (-ngl; -1 is
    every layer; default every layer with ``rpc`` or on a runtime with a GPU, else 0);
    ``cpu_moe`` (--cpu-moe) keeps every expert tensor in CPU memory, ``n_cpu_moe``
    (--n-cpu-moe) those of the first N layers; ``override_tensor`` (-ot) are
    ``PATTERN=BUFFER`` strings, a regular expression on tensor names and a buffer type
    ("CPU", "CUDA0", "RPC0[HOST:PORT]"). Other keywords go to ``llama_cpp.Llama``
    (n_ctx, n_threads, n_threads_batch, seed, ...).
    """
    from mc_gguf.runtime import placement
    from mc_gguf.runtime.status import REQUIRED_PATCH_LEVEL, require_patched_runtime

    path = Path(path)
    header = check_model(path)  # what llama.cpp's loader would abort on, refused with its reason
    reader = open_gguf(path)
    read_odp_metadata(path, reader)  # clear errors for malformed mc.odp.* before llama.cpp sees them
    check_expert_groups(path, reader)
    file_level = needed_patch_level(header)
    require_patched_runtime(max(REQUIRED_PATCH_LEVEL, file_level),
                            needed_by=f"{path} (mc.runtime.patch_level)" if file_level > REQUIRED_PATCH_LEVEL else "")
    overrides = dict(llama_kwargs.pop("kv_overrides", None) or {})
    if not odp:
        overrides[keys.ODP_ENABLED] = False
    if mu is not None:
        if not (math.isfinite(mu) and 0.0 <= mu <= 1.0):
            raise InvalidValueError(f"mu = {mu} is not in [0, 1]")
        overrides[keys.ODP_MU_ALL] = float(mu)
    if protect_ratio is not None:
        if not (math.isfinite(protect_ratio) and 0.0 <= protect_ratio <= 1.0):
            raise InvalidValueError(f"protect_ratio = {protect_ratio} is not in [0, 1]")
        overrides[keys.ODP_PROTECT_RATIO] = float(protect_ratio)
    llama_kwargs.setdefault("verbose", False)
    if llama_kwargs.get("n_ctx") is None:
        llama_kwargs["n_ctx"] = min(DEFAULT_MAX_CONTEXT, context_length(reader) or DEFAULT_MAX_CONTEXT)
    buffers = placement.tensor_overrides(override_tensor, cpu_moe, n_cpu_moe)
    if n_gpu_layers is not None and n_gpu_layers < -1:
        raise InvalidValueError(f"n_gpu_layers = {n_gpu_layers}: give a count of layers, or -1 for all")
    if rpc:
        from mc_gguf.runtime.rpc import add_servers

        add_servers(list(rpc))
    if n_gpu_layers is None:
        n_gpu_layers = -1 if rpc or placement.gpu_offload() else 0
    buffers = placement.resolve(buffers)  # after add_servers: their buffer types have names from then on
    del reader  # release the memory map before llama.cpp maps the file
    with _llama_log() as log:
        try:
            llm = _moe_llama_class(repack)(model_path=str(path), kv_overrides=overrides or None,
                                           n_gpu_layers=n_gpu_layers, tensor_buft_overrides=buffers, **llama_kwargs)
        except ValueError as exc:  # llama-cpp-python raises ValueError when llama.cpp refuses the file
            reason = log.reason()
            raise GGUFFileError(f"{path}: llama.cpp could not load it: {reason or exc}") from None
    llm.load_log = log.lines  # llama.cpp's last lines while loading: devices, buffers, layers placed
    llm.model_buffers = log.model_buffers  # where the weights went: {"CPU_Mapped": MiB, "CPU_REPACK": MiB, ...}
    return llm


class _LlamaLog:
    """llama.cpp's last log lines, kept while a model loads, and the model buffers it reported (load_tensors'
    "CPU_REPACK model buffer size =   810.00 MiB": name -> MiB)."""

    def __init__(self):
        self.lines: list[str] = []
        self.model_buffers: dict[str, float] = {}

    def add(self, line: str) -> None:
        self.lines.append(line)
        del self.lines[:-200]
        if "model buffer size" in line:
            name, _, size = line.split(":", 1)[-1].partition(" model buffer size =")
            try:
                self.model_buffers[name.strip()] = float(size.split()[0])
            except (ValueError, IndexError):
                pass

    def reason(self) -> str:
        """The loader's own explanation: its last error line (llama_model_load's 'error loading model: ...')."""
        errors = [line for line in self.lines if "error" in line.lower()]
        return (errors or self.lines or [""])[-1].strip()


def _usable_chat_templates(metadata: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``metadata`` less the chat templates jinja cannot compile, and why each of those cannot be."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    usable, problems = dict(metadata), {}
    for key, template in metadata.items():
        if key == CHAT_TEMPLATE_KEY or key.startswith(CHAT_TEMPLATE_KEY + "."):
            try:
                Jinja2ChatFormatter(template, eos_token="", bos_token="")  # compiles it as Llama.__init__ does
            except Exception as exc:  # noqa: BLE001 - jinja's errors, and whatever else its compiler raises
                problems[key] = template_reason(exc)
                del usable[key]
    return usable, problems


def template_reason(exc: Exception) -> str:
    """jinja's reason, with the template's line where it has one."""
    import jinja2

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno:
        reason += f" (line {exc.lineno})"
    return reason


@contextmanager
def _llama_log() -> Iterator[_LlamaLog]:
    """Route llama.cpp's log into a _LlamaLog for the block (llama-cpp-python's own logger afterwards)."""
    import llama_cpp
    from llama_cpp import _logger

    log = _LlamaLog()

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data) -> None:
        log.add(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield log
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
