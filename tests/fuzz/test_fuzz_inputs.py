"""Hostile inputs made by mutating valid ones meet one outcome: they load (and run), or the command ends with one
line and exit 1; never a signal, a hang, a traceback, "this is a bug", or a changed input file (issue 36).

Each reader is fuzzed from a valid file the session fixtures make: the tiny model's GGUFs (scan, check_model,
inspect, the loader's own checks, then llama.cpp through `run`), its config.json and safetensors headers
(open_checkpoint, convert), a plan from allocate (load_plan, plan-show, quantize) and its calibration statistics
(load_stats, allocate). Most examples call the readers in this process, where anything but an McGgufError (or
OSError) fails the test with its traceback; fewer run the command line in a child process, where an abort of
llama.cpp shows as a negative exit status.

The budget: MC_GGUF_FUZZ picks a Hypothesis profile. "ci" (the default, `make test`) runs
MC_GGUF_FUZZ_EXAMPLES examples (default 40) per in-process test and an eighth of that per command-line test,
derandomized so that every run draws the same ones. "fuzz" (`make fuzz`) draws at random, run after run of
MC_GGUF_FUZZ_EXAMPLES (default 32) examples, until each test's share of MC_GGUF_FUZZ_SECONDS (default 600) is
spent. Neither keeps a Hypothesis database (its other files go under pytest's temporary folder): a failure
prints the example and the `@reproduce_failure` line that replays it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from mc_gguf.errors import McGgufError
from mc_gguf.gguf_io.header import ARRAY, SCALARS, STRING, _ggml_sizes, scan

pytestmark = pytest.mark.fuzz

# ------------------------------------------------------------------------------------------------ the budget

PROFILE = os.environ.get("MC_GGUF_FUZZ", "ci")
if PROFILE not in ("ci", "fuzz"):
    raise ValueError(f"MC_GGUF_FUZZ={PROFILE!r}: choose ci or fuzz")
EXAMPLES = int(os.environ.get("MC_GGUF_FUZZ_EXAMPLES") or (40 if PROFILE == "ci" else 32))
SECONDS = float(os.environ.get("MC_GGUF_FUZZ_SECONDS") or 600)
COMMAND_TIMEOUT = 120  # seconds a command may take before the example counts as a hang
IN_PROCESS_TIMEOUT = 60  # the same for a reader called in this process

_common = dict(database=None, print_blob=True, max_examples=EXAMPLES,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
settings.register_profile("ci", derandomize=True, **_common)
settings.register_profile("fuzz", derandomize=False, **_common)

# each test's share of the fuzz profile's time
SHARES = {"gguf": 2.0, "gguf_cli": 3.0, "checkpoint": 1.0, "checkpoint_cli": 1.0, "plan": 0.5, "plan_cli": 1.0,
          "stats": 1.0, "stats_cli": 1.0}


def fuzz_settings(command_line: bool) -> settings:
    """The profile's settings for an in-process test (a deadline per example) or a command-line test (the
    commands' own timeout; an eighth of the examples)."""
    if command_line:  # a command takes seconds: the first failing example is reported as drawn, not shrunk
        return settings(settings.get_profile(PROFILE), max_examples=max(1, EXAMPLES // 8), deadline=None,
                        phases=(Phase.explicit, Phase.reuse, Phase.generate))
    return settings(settings.get_profile(PROFILE), deadline=timedelta(seconds=IN_PROCESS_TIMEOUT / 2))


def fuzz(test: Callable[[], None], share: str) -> None:
    """Run the Hypothesis test once (ci), or run after run of it, each with new random examples, until its share
    of MC_GGUF_FUZZ_SECONDS is spent (fuzz)."""
    started = time.monotonic()
    stop = started + SECONDS * SHARES[share] / sum(SHARES.values())
    runs = 0
    while True:
        test()
        runs += 1
        if PROFILE == "ci" or time.monotonic() >= stop:
            break
    if PROFILE == "fuzz":
        print(f"\n{share}: {runs} runs of up to {EXAMPLES} examples in {time.monotonic() - started:.0f} s",
              file=sys.stderr)


class Hang(Exception):
    """A reader took longer than IN_PROCESS_TIMEOUT."""


@contextlib.contextmanager
def watchdog(seconds: float = IN_PROCESS_TIMEOUT):
    """Raise Hang in this (main) thread when the block runs longer than ``seconds``."""
    def expired(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tolerated(call: Callable, *args, **kwargs):
    """``call``'s result, or None when it refused its input as mc-gguf refuses it (McGgufError, OSError): any other
    exception is a defect and fails the example with its traceback."""
    try:
        with watchdog():
            return call(*args, **kwargs)
    except (McGgufError, OSError):
        return None


# ------------------------------------------------------------------------------------- the command line

def mc_gguf(*argv: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "mc_gguf", *argv], capture_output=True, text=True,
                              errors="replace", timeout=COMMAND_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"mc-gguf {' '.join(argv)} still ran after {COMMAND_TIMEOUT} s") from None


def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (links followed)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def assert_clean(result: subprocess.CompletedProcess) -> None:
    """Exit 0 without an error line, or exit 1 with exactly one 'mc-gguf: error:' line; never a signal, a
    traceback, or "this is a bug"."""
    err = result.stderr
    command = " ".join(map(str, result.args[3:]))
    assert result.returncode >= 0, f"{command}: killed by signal {-result.returncode}\n{err[-3000:]}"
    assert result.returncode in (0, 1), f"{command}: exit {result.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err and "this is a bug" not in err, f"{command}:\n{err[-3000:]}"
    lines = [line for line in err.splitlines() if line.startswith("mc-gguf: error:")]
    assert len(lines) == result.returncode, f"{command}: exit {result.returncode}, error lines:\n{err[-3000:]}"


def run_clean(inputs: list[Path], *argv: str) -> subprocess.CompletedProcess:
    """Run a command on ``inputs``; assert its outcome is clean and the inputs are as they were."""
    before = digest(*inputs)
    result = mc_gguf(*argv)
    assert_clean(result)
    assert digest(*inputs) == before, f"mc-gguf {' '.join(argv)} changed its input"
    return result


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory):
    """Hypothesis's own files (its caches; the profiles keep no database) under pytest's temporary folder, not
    in the working tree."""
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def scratch(work: Path):
    """A fresh folder for one example, removed after it."""
    folder = Path(tempfile.mkdtemp(dir=work))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- values that break readers more than most

INTS = (0, 1, -1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 63, 64, 255, 256, 511, 512, 1023, 1024, 1025, 4096, 31999, 32000,
        32001, 65535, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 53 + 1, 2 ** 63 - 1, -2 ** 31, -2 ** 63)
FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-5, -1e-5, 1e-45, 5e-324, 1e6, 1e30, 3.5e38, 1e300, math.nan, math.inf,
          -math.inf)
WORDS = ("", "llama", "qwen3moe", "qwen2moe", "olmoe", "deepseek2", "glm4moe", "gpt-oss", "clip", "mixtral",
         "gpt2", "bert", "t5", "rwkv", "none", "no_vocab", "ugm", "plamo2", "default", "llama3", "qwen2", "linear",
         "yarn", "longrope", "adapter", "mmproj", "lora", "model", "per-expert", "stock", "Q4_K", "IQ2_XS", "\0",
         "{% if %}", "{{ messages[0] }}", "a" * 300, "é", "\ud7ff")

ints = st.one_of(st.sampled_from(INTS), st.integers(-2 ** 63, 2 ** 64 - 1))
floats = st.one_of(st.sampled_from(FLOATS), st.floats(allow_nan=True, allow_infinity=True))
texts = st.one_of(st.sampled_from(WORDS), st.text(max_size=24))
odd_bytes = st.one_of(texts.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(max_size=24))


# ======================================================================================================= GGUF

def _pack(width: int, value: int) -> bytes:
    """``value`` as a little-endian integer of ``width`` bytes, wrapped (so -1 is all ones)."""
    return (int(value) % (1 << 8 * width)).to_bytes(width, "little")


def _string(raw: bytes) -> bytes:
    return _pack(8, len(raw)) + raw


def encode(value_type: int, value) -> bytes:
    """A GGUF value of ``value_type`` (gguf.h's gguf_type); an array's value is (element type, items)."""
    if value_type == STRING:
        return _string(value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass"))
    if value_type == ARRAY:
        element, items = value
        if element in SCALARS and isinstance(items, np.ndarray):
            body = items.astype(SCALARS[element]).tobytes()
        else:
            body = b"".join(encode(element, item) for item in items)
        return _pack(4, element) + _pack(8, len(items)) + body
    if value_type in (6, 12):  # float32, float64
        with np.errstate(over="ignore"):
            return np.array(float(value), dtype=SCALARS[value_type]).tobytes()
    if value_type in SCALARS:
        return _pack(np.dtype(SCALARS[value_type]).itemsize, value)
    return b""  # a type gguf.h does not have: nothing after it


@dataclass
class KV:
    key: bytes
    type: int
    payload: bytes
    value: object = None   # the decoded value (arrays: (element type, items)), where known


@dataclass
class Tensor:
    name: bytes
    shape: list[int]
    type: int
    offset: int
    n_dims: int | None = None   # the count the file declares, where it differs from len(shape)


@dataclass
class Gguf:
    """A GGUF as parts that a mutation can change one at a time, written back as gguf.cpp reads it."""

    version: int
    kv: list[KV]
    tensors: list[Tensor]
    data: memoryview
    chunks: dict[bytes, bytes]   # each tensor's data in the valid file, by name
    alignment: int = 32
    n_kv: int | None = None
    n_tensors: int | None = None

    @classmethod
    def read(cls, path: Path) -> Gguf:
        header = scan(path)
        raw = memoryview(path.read_bytes())
        kv = []
        for key, value in header.fields.items():
            types = header.types[key]
            if types[0] == ARRAY:
                items = value if isinstance(value, list) else np.asarray(value)
                if types[1] == 7:
                    items = items.astype(np.uint8)
                kv.append(KV(key.encode(), ARRAY, encode(ARRAY, (types[1], items)), (types[1], items)))
            else:
                kv.append(KV(key.encode(), types[0], encode(types[0], value), value))
        tensors = [Tensor(t.name.encode(), list(t.shape), t.type, t.offset) for t in header.tensors]
        data = raw[header.data_offset:]
        chunks = {t.name.encode(): bytes(data[t.offset:t.offset + t.nbytes]) for t in header.tensors}
        return cls(header.version, kv, tensors, data, chunks, header.fields.get("general.alignment", 32))

    def to_bytes(self) -> tuple[bytes, dict[str, tuple[int, int]]]:
        """The file, and where its parts are: "kv" (the keys before the first array), "tensors" (the tensor
        table), "header" (all before the data)."""
        out = bytearray(b"GGUF" + _pack(4, self.version))
        out += _pack(8, len(self.tensors) if self.n_tensors is None else self.n_tensors)
        out += _pack(8, len(self.kv) if self.n_kv is None else self.n_kv)
        kv_end = None
        for entry in self.kv:
            if entry.type == ARRAY and kv_end is None:
                kv_end = len(out)
            out += _string(entry.key) + _pack(4, entry.type) + entry.payload
        table = len(out)
        for t in self.tensors:
            out += _string(t.name) + _pack(4, len(t.shape) if t.n_dims is None else t.n_dims)
            out += b"".join(_pack(8, d) for d in t.shape) + _pack(4, t.type) + _pack(8, t.offset)
        regions = {"kv": (24, kv_end or table), "tensors": (table, len(out)), "header": (0, len(out))}
        out += bytes(-len(out) % 32)
        return bytes(out) + bytes(self.data), regions

    def find(self, key: str) -> int | None:
        return next((i for i, entry in enumerate(self.kv) if entry.key == key.encode()), None)

    def relayout(self) -> None:
        """Offsets back to back in table order (as gguf.cpp expects), each tensor's data its valid bytes cut or
        padded with zeros to its new size; left as they are when a size cannot be computed."""
        sizes = _ggml_sizes()
        nbytes = []
        for t in self.tensors:
            if t.type not in sizes or not t.shape or any(d < 1 for d in t.shape) or len(t.shape) > 4:
                return
            block, block_bytes = sizes[t.type]
            if t.shape[0] % block:
                return
            nbytes.append(math.prod(t.shape) // block * block_bytes)
        if sum(nbytes) > 64 << 20:
            return
        data, offset = bytearray(), 0
        for t, n in zip(self.tensors, nbytes):
            t.offset = offset
            chunk = self.chunks.get(t.name, b"")[:n]
            data += chunk + bytes(n - len(chunk)) + bytes(-n % self.alignment)
            offset = len(data)
        self.data = memoryview(bytes(data))


def copy_gguf(g: Gguf) -> Gguf:
    return replace(g, kv=[replace(e) for e in g.kv], tensors=[replace(t, shape=list(t.shape)) for t in g.tensors])


# the keys a mutation may set besides the file's own: every key llama.cpp or mc-gguf reads, for "llama"
def _known_keys() -> list[str]:
    import inspect

    import gguf

    from mc_gguf.gguf_io import keys

    found = [v.format(arch="llama") for cls in vars(gguf.Keys).values() if inspect.isclass(cls)
             for name, v in vars(cls).items() if isinstance(v, str) and not name.startswith("_") and "{" not in
             v.replace("{arch}", "")]
    return sorted(set(found) | {k.name for k in keys.KEYS})


TENSOR_NAMES = (b"blk.0.attn_q.weight", b"blk.2.attn_q.weight", b"blk.1.ffn_gate_exps.g1.weight", b"output.weight",
                b"token_embd.weight", b"blk.0.ffn_gate_inp.weight", b"x" * 63, b"x" * 64, b"", b"\xff\xfe")


def value_of_type(value_type: int) -> st.SearchStrategy:
    """A value for a key of ``value_type``; arrays: (element type, items)."""
    if value_type == STRING:
        return odd_bytes
    if value_type == ARRAY:
        element = st.sampled_from([*SCALARS, STRING])
        return element.flatmap(lambda e: st.tuples(st.just(e), st.lists(value_of_type(e), max_size=6)))
    if value_type in (6, 12):
        return floats
    if value_type in SCALARS:
        return ints
    return st.just(None)


GGUF_TYPES = (*SCALARS, STRING, ARRAY)


def gguf_mutations(g: Gguf, structural: bool) -> st.SearchStrategy:
    """One to three mutations of ``g``, as tuples (what, where, how) that a failing example prints legibly.
    ``structural`` adds those that break the file's structure (counts, declared lengths, offsets, truncation,
    flipped bytes), which the scan refuses before llama.cpp sees them."""
    keys = [e.key.decode() for e in g.kv]
    arrays = [e.key.decode() for e in g.kv if e.type == ARRAY]
    any_key = st.sampled_from(sorted(set(keys) | set(_known_keys())))
    own_key = st.sampled_from(keys)
    tensor = st.integers(0, len(g.tensors) - 1)
    shape_value = st.one_of(st.sampled_from((0, 1, 2, 4, 32, 128, 256, 512, 1024, 32000, -1, 2 ** 31, 2 ** 62)),
                            st.integers(-2 ** 63, 2 ** 63 - 1))
    ggml_type = st.one_of(st.sampled_from(sorted(_ggml_sizes())), st.sampled_from((-1, 4, 5, 42, 1000, 2 ** 31)))
    semantic = [
        st.tuples(st.just("set"), any_key, st.sampled_from(GGUF_TYPES)).flatmap(
            lambda m: st.tuples(st.just(m[0]), st.just(m[1]), st.just(m[2]), value_of_type(m[2]))),
        # a value of the key's own type: most reach llama.cpp
        own_key.flatmap(lambda k: st.tuples(st.just("set"), st.just(k), st.just(g.kv[keys.index(k)].type),
                                            value_of_type(g.kv[keys.index(k)].type))
                        if g.kv[keys.index(k)].type != ARRAY else
                        st.tuples(st.just("item"), st.just(k), st.integers(0, 2 ** 20),
                                  value_of_type(g.kv[keys.index(k)].value[0]))),
        st.tuples(st.just("delete"), own_key),
        st.tuples(st.just("retype"), own_key, st.sampled_from(GGUF_TYPES)),
        st.tuples(st.just("resize"), st.sampled_from(arrays), st.sampled_from((0, 1, 2, 3, 31999, 32001))),
        st.tuples(st.just("tensor_shape"), tensor, st.integers(0, 4), shape_value),
        st.tuples(st.just("tensor_type"), tensor, ggml_type),
        st.tuples(st.just("tensor_delete"), tensor),
        st.tuples(st.just("tensor_rename"), tensor, st.sampled_from(TENSOR_NAMES)),
    ]
    broken = [
        st.tuples(st.just("duplicate"), own_key),
        st.tuples(st.just("rename"), own_key, odd_bytes),
        st.tuples(st.just("length"), st.sampled_from(arrays), ints),
        st.tuples(st.just("tensor_ndims"), tensor, ints),
        st.tuples(st.just("tensor_offset"), tensor, ints),
        st.tuples(st.just("tensor_duplicate"), tensor),
        st.tuples(st.just("stale_offsets")),
        st.tuples(st.just("version"), ints),
        st.tuples(st.just("n_kv"), ints),
        st.tuples(st.just("n_tensors"), ints),
        st.tuples(st.just("truncate"), st.sampled_from(("kv", "tensors", "header", "data")), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.sampled_from(("kv", "tensors", "header")), st.floats(0, 1),
                  st.integers(1, 255)),
    ]
    return st.lists(st.one_of(*semantic, *(broken if structural else ())), min_size=1, max_size=3)


def mutated_gguf(g: Gguf, mutations: list[tuple]) -> bytes:
    """The file ``g`` with ``mutations`` applied in order; tensor changes re-lay the data out unless
    "stale_offsets" is among them."""
    g = copy_gguf(g)
    cuts, flips = [], []
    keys = lambda: [e.key for e in g.kv]  # noqa: E731
    for what, *how in mutations:
        if what == "set":
            key, value_type, value = how
            entry = KV(key.encode(), value_type, encode(value_type, value), value)
            i = g.find(key)
            if i is None:
                g.kv.append(entry)
            else:
                g.kv[i] = entry
        elif what == "item":
            key, index, value = how
            i = g.find(key)
            if i is None:
                continue
            element, items = g.kv[i].value
            if not len(items):
                continue
            items = list(items) if isinstance(items, list) else items.copy()
            with np.errstate(over="ignore", invalid="ignore"):
                if isinstance(items, list):
                    items[index % len(items)] = value
                elif element in (6, 12):
                    items[index % len(items)] = value
                else:
                    items = items.astype(object)
                    items[index % len(items)] = value
                    items = [int(v) for v in items]
            g.kv[i] = KV(g.kv[i].key, ARRAY, encode(ARRAY, (element, items)), (element, items))
        elif what in ("delete", "duplicate", "retype", "rename", "resize", "length"):
            i = g.find(how[0])
            if i is None:
                continue
            entry = g.kv[i]
            if what == "delete":
                del g.kv[i]
            elif what == "duplicate":
                g.kv.insert(i + 1, replace(entry))
            elif what == "retype":
                g.kv[i] = replace(entry, type=how[1])
            elif what == "rename":
                g.kv[i] = replace(entry, key=how[1])
            elif what == "resize" and entry.type == ARRAY:
                element, items = entry.value
                n = how[1]
                items = items[:n] if n <= len(items) else (
                    list(items) + [items[-1] if len(items) else b"x"] * (n - len(items)) if isinstance(items, list)
                    else np.concatenate([items, np.zeros(n - len(items), items.dtype)]))
                g.kv[i] = KV(entry.key, ARRAY, encode(ARRAY, (element, items)), (element, items))
            elif what == "length" and entry.type == ARRAY:
                g.kv[i] = replace(entry, payload=entry.payload[:4] + _pack(8, how[1]) + entry.payload[12:])
        elif what == "tensor_shape":
            t = g.tensors[how[0] % len(g.tensors)]
            dim, value = how[1], how[2]
            if dim < len(t.shape):
                t.shape[dim] = value
            else:
                t.shape.append(value)
        elif what == "tensor_type":
            g.tensors[how[0] % len(g.tensors)].type = how[1]
        elif what == "tensor_delete":
            del g.tensors[how[0] % len(g.tensors)]
        elif what == "tensor_rename":
            g.tensors[how[0] % len(g.tensors)].name = how[1]
        elif what == "tensor_ndims":
            g.tensors[how[0] % len(g.tensors)].n_dims = how[1]
        elif what == "tensor_offset":
            g.tensors[how[0] % len(g.tensors)].offset = how[1]
        elif what == "tensor_duplicate":
            i = how[0] % len(g.tensors)
            g.tensors.insert(i + 1, replace(g.tensors[i], shape=list(g.tensors[i].shape)))
        elif what == "version":
            g.version = how[0]
        elif what in ("n_kv", "n_tensors"):
            setattr(g, what, how[0])
        elif what == "truncate":
            cuts.append(how)
        elif what == "flip":
            flips.append(how)
        if not g.tensors:
            break
    if any(m[0].startswith("tensor_") for m in mutations) and not any(m[0] == "stale_offsets" for m in mutations):
        g.relayout()
    raw, regions = g.to_bytes()
    raw = bytearray(raw)
    for region, where, xor in flips:
        start, end = regions[region]
        if end > start:
            raw[start + min(int(where * (end - start)), end - start - 1)] ^= xor
    for region, where in cuts:
        start, end = regions[region] if region != "data" else (regions["header"][1], len(raw))
        del raw[start + int(where * (end - start)):]
    return bytes(raw)


@pytest.fixture(scope="module")
def mc_model(tiny_model_dir, calibration, work) -> Path:
    """A per-expert GGUF of mixed types (mc.experts.groups, groups of stacked experts) with per-expert ODP
    thresholds: what the patched runtime reads beyond stock llama.cpp."""
    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.prune.calibration import write_odp_metadata
    from mc_gguf.prune.rule import OdpParams
    from mc_gguf.quantize.quantization import quantize

    _, stats = calibration
    plan = allocate(stats, 3.0, model_dir=tiny_model_dir, types=["Q2_K", "Q4_K", "Q8_0"])
    out = quantize(tiny_model_dir, plan, work / "mixed.gguf", stats=stats, gptq=False, progress=False)
    return write_odp_metadata(out, work / "mixed-odp.gguf",
                              OdpParams.per_expert([[0.1, 0.2, 0.0, 0.3], [0.2, 0.2, 0.2, 0.2]], 0.02))


@pytest.fixture(scope="module")
def valid_ggufs(converted, mc_model) -> list[Gguf]:
    return [Gguf.read(converted("q8_0")), Gguf.read(mc_model)]


def read_gguf_as_commands_do(path: Path) -> None:
    """What inspect and run do before llama.cpp sees the file."""
    from mc_gguf.loader.model import check_expert_groups, context_length, read_odp_metadata
    from mc_gguf.gguf_io.edit import open_gguf
    from mc_gguf.gguf_io.inspect import describe, inspect_gguf
    from mc_gguf.gguf_io.validate import check_model

    info = tolerated(inspect_gguf, path)
    if info is not None:
        json.dumps(info)
        describe(info)
    if tolerated(check_model, path) is not None:
        reader = tolerated(open_gguf, path)
        assert reader is not None, "check_model passed, gguf-py's reader refused"
        tolerated(read_odp_metadata, path, reader)
        tolerated(check_expert_groups, path, reader)
        context_length(reader)


def test_the_writer_reproduces_the_valid_files_byte_for_byte(valid_ggufs, converted, mc_model):
    """Unmutated, the parts write back the very file: a mutated file differs from it by its mutations only."""
    for g, path in zip(valid_ggufs, (converted("q8_0"), mc_model)):
        assert g.to_bytes()[0] == path.read_bytes()


def test_gguf_readers_refuse_mutated_files_cleanly(valid_ggufs, work):
    """scan, check_model, inspect and the loader's checks: a result or an McGgufError, for any mutation."""

    @fuzz_settings(command_line=False)
    @given(st.sampled_from(range(len(valid_ggufs))).flatmap(
        lambda i: st.tuples(st.just(i), gguf_mutations(valid_ggufs[i], structural=True))))
    def example(case):
        base, mutations = case
        with scratch(work) as folder:
            path = folder / "mutated.gguf"
            path.write_bytes(mutated_gguf(valid_ggufs[base], mutations))
            before = digest(path)
            read_gguf_as_commands_do(path)
            assert digest(path) == before

    fuzz(example, "gguf")


def test_inspect_and_run_load_or_refuse_mutated_ggufs_in_one_line(valid_ggufs, work):
    """The real commands, in a child process: llama.cpp loads and runs what the checks let through, or refuses
    it with its reason; it never aborts."""

    @fuzz_settings(command_line=True)
    @given(st.sampled_from(range(len(valid_ggufs))).flatmap(
        lambda i: st.tuples(st.just(i), gguf_mutations(valid_ggufs[i], structural=False))))
    def example(case):
        base, mutations = case
        with scratch(work) as folder:
            path = folder / "mutated.gguf"
            path.write_bytes(mutated_gguf(valid_ggufs[base], mutations))
            run_clean([path], "inspect", str(path))
            run_clean([path], "run", str(path), "-p", "hi", "-n", "1")

    fuzz(example, "gguf_cli")


# ================================================================================================ JSON files

def _json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3)


json_leaves = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(json_leaves, _json_containers, max_leaves=6)


def json_paths(doc, prefix: tuple = ()) -> list[tuple]:
    """The path of every value in ``doc`` (keys and list indices), the document itself left out."""
    paths = [prefix] if prefix else []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        paths += json_paths(value, (*prefix, key))
    return paths


def json_mutations(doc, extra_keys: tuple[str, ...] = (), values: st.SearchStrategy = json_values,
                   text: bool = True) -> st.SearchStrategy:
    """One to three changes of a JSON document: a value set (of any type), deleted or inserted before, at any
    path (and at ``extra_keys`` at the top); the whole document replaced; or (``text``) its text cut, a byte
    flipped, made too deep to parse, not UTF-8."""
    path = st.sampled_from(json_paths(doc) + [(key,) for key in extra_keys])
    ops = [st.tuples(st.just("set"), path, values), st.tuples(st.just("delete"), path),
           st.tuples(st.just("insert"), path, values), st.tuples(st.just("whole"), json_values)]
    if text:
        ops.append(st.tuples(st.just("text"), st.sampled_from(("cut", "flip", "deep", "not utf-8", "bom")),
                             st.floats(0, 1), st.integers(1, 255)))
    return st.lists(st.one_of(*ops), min_size=1, max_size=3)


def mutated_json(doc, mutations: list[tuple]) -> bytes:
    doc = json.loads(json.dumps(doc))
    edits = []
    for what, *how in mutations:
        if what == "whole":
            doc = how[0]
        elif what == "text":
            edits.append(how)
        else:
            *parents, last = how[0]
            parent = doc
            for step in parents:
                try:
                    parent = parent[step]
                except (KeyError, IndexError, TypeError):
                    parent = None
                    break
            if isinstance(parent, dict):
                if what == "delete":
                    parent.pop(last, None)
                else:
                    parent[last] = how[1]
            elif isinstance(parent, list) and isinstance(last, int):
                if what == "delete" and last < len(parent):
                    del parent[last]
                elif what == "insert":
                    parent.insert(last, how[1])
                elif what == "set" and last < len(parent):
                    parent[last] = how[1]
    raw = json.dumps(doc).encode()
    for kind, where, byte in edits:
        at = int(where * len(raw))
        if kind == "cut":
            raw = raw[:at]
        elif kind == "flip" and raw:
            at = min(at, len(raw) - 1)
            raw = raw[:at] + bytes([raw[at] ^ byte]) + raw[at + 1:]
        elif kind == "deep":
            raw = b"[" * 100_000 + b"]" * 100_000
        elif kind == "not utf-8":
            raw = raw[:at] + b"\xff\xfe" + raw[at:]
        elif kind == "bom":
            raw = b"\xef\xbb\xbf" + raw
    return raw


# ================================================================================================ checkpoints

def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and its data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
                      "F8_E4M3", "F8_E5M2", "F4", "C64", "f32", "", "F", None, 4)
REINTERPRET = {"F32": ("F16", 2), "F16": ("F32", 0.5), "BF16": ("I8", 2)}  # same bytes: the last dimension scaled


def safetensors_mutations(header: dict) -> st.SearchStrategy:
    """One to three changes of a safetensors header: an entry's dtype, shape or data_offsets (to other values or
    other types), the entry deleted, added or replaced, a reinterpretation that keeps the bytes (another dtype,
    another shape of as many elements), __metadata__ replaced, the length prefix changed, the JSON text cut or
    flipped."""
    name = st.sampled_from(sorted(k for k in header if k != "__metadata__"))
    dims = st.lists(st.one_of(st.sampled_from((0, 1, 2, 4, 128, 256, 512, 32000)), ints, floats, texts), max_size=4)
    ops = [
        st.tuples(st.just("dtype"), name, st.sampled_from(SAFETENSORS_DTYPES)),
        st.tuples(st.just("shape"), name, st.one_of(dims, json_values)),
        st.tuples(st.just("dim"), name, st.integers(0, 3), ints),
        st.tuples(st.just("data_offsets"), name, st.one_of(st.lists(ints, max_size=3), json_values)),
        st.tuples(st.just("offset"), name, st.integers(0, 1), st.one_of(ints, st.integers(-64, 64))),
        st.tuples(st.just("entry"), name, json_values),
        st.tuples(st.just("delete"), name),
        st.tuples(st.just("add"), texts, json_values),
        st.tuples(st.just("transpose"), name),
        st.tuples(st.just("flatten"), name),
        st.tuples(st.just("reinterpret"), name),
        st.tuples(st.just("metadata"), json_values),
        st.tuples(st.just("prefix"), st.one_of(ints, st.integers(-16, 16))),
        st.tuples(st.just("text"), st.sampled_from(("cut", "flip", "deep", "not utf-8")), st.floats(0, 1),
                  st.integers(1, 255)),
    ]
    return st.lists(st.one_of(*ops), min_size=1, max_size=3)


def mutated_safetensors(header: dict, data: bytes, mutations: list[tuple]) -> bytes:
    header = json.loads(json.dumps(header))
    prefix, edits = None, []
    for what, *how in mutations:
        entry = header.get(how[0]) if what not in ("add", "metadata", "prefix", "text") else None
        if what in ("dtype", "shape", "data_offsets") and isinstance(entry, dict):
            entry[what] = how[1]
        elif what == "dim" and isinstance(entry, dict) and isinstance(entry.get("shape"), list):
            shape = entry["shape"]
            if how[1] < len(shape):
                shape[how[1]] = how[2]
            else:
                shape.append(how[2])
        elif what == "offset" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) \
                and len(entry["data_offsets"]) > how[1] and isinstance(entry["data_offsets"][how[1]], int):
            entry["data_offsets"][how[1]] += how[2]
        elif what == "entry" and how[0] in header:
            header[how[0]] = how[1]
        elif what == "delete":
            header.pop(how[0], None)
        elif what == "add":
            header[how[0]] = how[1]
        elif what in ("transpose", "flatten", "reinterpret") and isinstance(entry, dict) \
                and isinstance(entry.get("shape"), list) and all(isinstance(d, int) for d in entry["shape"]):
            shape = entry["shape"]
            if what == "transpose":
                entry["shape"] = shape[::-1]
            elif what == "flatten":
                entry["shape"] = [math.prod(shape)]
            elif entry.get("dtype") in REINTERPRET and shape:
                dtype, scale = REINTERPRET[entry["dtype"]]
                if shape[-1] * scale == int(shape[-1] * scale):
                    entry["dtype"], entry["shape"] = dtype, [*shape[:-1], int(shape[-1] * scale)]
        elif what == "metadata":
            header["__metadata__"] = how[0]
        elif what == "prefix":
            prefix = how[0]
        elif what == "text":
            edits.append(how)
    text = json.dumps(header, separators=(",", ":")).encode()
    for kind, where, byte in edits:
        at = min(int(where * len(text)), len(text) - 1)
        if kind in ("cut", "flip") and not text:
            continue
        if kind == "cut":
            text = text[:at]
        elif kind == "flip":
            text = text[:at] + bytes([text[at] ^ byte]) + text[at + 1:]
        elif kind == "deep":
            text = b"[" * 100_000 + b"]" * 100_000
        else:
            text = text[:at] + b"\xff" + text[at:]
    text += b" " * (-len(text) % 8)
    length = len(text) if prefix is None else prefix if prefix > 16 or prefix < -16 else len(text) + prefix
    return _pack(8, length) + text + data


@dataclass
class ModelFiles:
    folder: Path
    config: dict
    index: dict
    shards: dict[str, tuple[dict, bytes]]   # shard name -> (header, data)

    def copy_with(self, into: Path, changed: dict[str, bytes]) -> Path:
        """A model folder whose files link to the valid model's, but for ``changed`` (name -> bytes)."""
        model = into / "model"
        model.mkdir()
        for f in self.folder.iterdir():
            if f.name in changed:
                (model / f.name).write_bytes(changed[f.name])
            else:
                (model / f.name).symlink_to(f)
        return model


@pytest.fixture(scope="module")
def model_files(tiny_model_dir) -> ModelFiles:
    return ModelFiles(tiny_model_dir, json.loads((tiny_model_dir / "config.json").read_text()),
                      json.loads((tiny_model_dir / "model.safetensors.index.json").read_text()),
                      {f.name: safetensors_parts(f) for f in sorted(tiny_model_dir.glob("*.safetensors"))})


# config.json keys the readers look for that the tiny Mixtral's config leaves out
CONFIG_KEYS = ("rope_theta", "head_dim", "mlp_only_layers", "decoder_sparse_step", "moe_layer_freq",
               "first_k_dense_replace", "quantization_config", "topk_method", "moe_intermediate_size",
               "tie_word_embeddings", "n_routed_experts", "num_experts", "rope_scaling", "norm_topk_prob")


def checkpoint_mutations(files: ModelFiles) -> st.SearchStrategy:
    """(file name, mutations) of config.json, the shard index, or one shard's header."""
    shard = st.sampled_from(sorted(files.shards))
    return st.one_of(
        st.tuples(st.just("config.json"), json_mutations(files.config, CONFIG_KEYS)),
        st.tuples(st.just("model.safetensors.index.json"), json_mutations(files.index, ("weight_map",))),
        shard.flatmap(lambda name: st.tuples(st.just(name), safetensors_mutations(files.shards[name][0]))))


def mutated_checkpoint_file(files: ModelFiles, name: str, mutations: list[tuple]) -> bytes:
    if name == "config.json":
        return mutated_json(files.config, mutations)
    if name == "model.safetensors.index.json":
        return mutated_json(files.index, mutations)
    return mutated_safetensors(*files.shards[name], mutations)


def test_checkpoint_readers_refuse_mutated_files_cleanly(model_files, work):
    """open_checkpoint, then (when it opens) the conversion: a GGUF or an McGgufError."""
    from mc_gguf.gguf_io.convert import convert

    @fuzz_settings(command_line=False)
    @given(checkpoint_mutations(model_files))
    def example(case):
        name, mutations = case
        with scratch(work) as folder:
            model = model_files.copy_with(folder, {name: mutated_checkpoint_file(model_files, name, mutations)})
            before = digest(model / name)
            tolerated(convert, model, folder / "out.gguf", "q8_0", progress=False)
            assert digest(model / name) == before

    fuzz(example, "checkpoint")


def test_convert_converts_or_refuses_mutated_checkpoints_in_one_line(model_files, work):
    """convert in a child process; what it writes, run loads and runs or refuses in one line."""

    @fuzz_settings(command_line=True)
    @given(checkpoint_mutations(model_files))
    def example(case):
        name, mutations = case
        with scratch(work) as folder:
            model = model_files.copy_with(folder, {name: mutated_checkpoint_file(model_files, name, mutations)})
            out = folder / "out.gguf"
            result = run_clean([model, model_files.folder], "convert", str(model), "-o", str(out), "-q",
                               "--type", "q8_0")
            assert (result.returncode == 0) == out.is_file(), result.stderr[-2000:]
            if result.returncode == 0:
                run_clean([out], "run", str(out), "-p", "hi", "-n", "1")

    fuzz(example, "checkpoint_cli")


# ====================================================================================================== plans

def type_names() -> list:
    from mc_gguf.ggml.types import TYPES

    return [*TYPES, *(t.lower() for t in TYPES), "Q4_2", "F8", "Q4_K_M", "", None, 8, ["Q4_K"], {"Q4_K": 1}]


@pytest.fixture(scope="module")
def plan_file(tiny_model_dir, calibration, work) -> Path:
    from mc_gguf.allocate.allocation import allocate

    stats_path, stats = calibration
    plan = allocate(stats, 3.0, model_dir=tiny_model_dir, stats_path=str(stats_path))
    return plan.save(work / "plan.json")


def plan_mutations(plan_file: Path) -> st.SearchStrategy:
    """JSON mutations of the plan whose values lean to type names (of every case, and not types at all)."""
    doc = json.loads(plan_file.read_text())
    return json_mutations(doc, ("format", "layout", "experts", "non_expert", "budget", "predicted", "inputs",
                                "extra"), st.one_of(st.sampled_from(type_names()), json_values))


def test_plan_readers_refuse_mutated_plans_cleanly(plan_file, work):
    """load_plan and what plan-show prints: a plan described, or an McGgufError."""
    from mc_gguf.allocate.plan import load_plan
    from mc_gguf.allocate.show import describe_plan

    @fuzz_settings(command_line=False)
    @given(plan_mutations(plan_file))
    def example(mutations):
        with scratch(work) as folder:
            path = folder / "plan.json"
            path.write_bytes(mutated_json(json.loads(plan_file.read_text()), mutations))
            plan = tolerated(load_plan, path)
            if plan is not None:
                tolerated(describe_plan, plan)

    fuzz(example, "plan")


def test_plan_show_and_quantize_take_or_refuse_mutated_plans_in_one_line(plan_file, tiny_model_dir, calibration,
                                                                         work):
    """plan-show and quantize in a child process (quantize takes no plan plan-show refuses); what quantize writes,
    run loads and runs or refuses in one line."""
    stats_path, _ = calibration

    @fuzz_settings(command_line=True)
    @given(plan_mutations(plan_file))
    def example(mutations):
        with scratch(work) as folder:
            path = folder / "plan.json"
            path.write_bytes(mutated_json(json.loads(plan_file.read_text()), mutations))
            shown = run_clean([path], "plan-show", str(path))
            out = folder / "out.gguf"
            result = run_clean([path, stats_path, tiny_model_dir], "quantize", str(tiny_model_dir), "--plan",
                               str(path), "--stats", str(stats_path), "--no-gptq", "-q", "-o", str(out))
            assert shown.returncode <= result.returncode, "quantize took a plan that plan-show refused"
            if result.returncode == 0:
                run_clean([out], "run", str(out), "-p", "hi", "-n", "1")

    fuzz(example, "plan_cli")


# ============================================================================================ statistics files

def stats_parts(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The statistics' header (the JSON in the safetensors metadata) and their arrays."""
    from safetensors.numpy import load_file

    from mc_gguf.calibrate.stats import METADATA_KEY

    header, _ = safetensors_parts(path)
    return json.loads(header["__metadata__"][METADATA_KEY]), load_file(str(path))


ARRAY_DTYPES = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_)


def stats_mutations(path: Path) -> st.SearchStrategy:
    """Changes of a statistics file: of its header's JSON (as any JSON document), of its arrays (reshaped, cut,
    grown, another dtype, filled with NaN, inf, negative or huge values, deleted, renamed) written back as a
    consistent safetensors file, or of the safetensors header itself."""
    info, arrays = stats_parts(path)
    name = st.sampled_from(sorted(arrays))
    array_ops = st.one_of(
        st.tuples(st.just("reshape"), name, st.integers(0, 2), st.integers(0, 9)),
        st.tuples(st.just("dims"), name, st.sampled_from(("drop", "add"))),
        st.tuples(st.just("astype"), name, st.sampled_from(ARRAY_DTYPES)),
        st.tuples(st.just("fill"), name, st.sampled_from((math.nan, math.inf, -math.inf, -1.0, 0.0, 1e30)),
                  st.booleans()),
        st.tuples(st.just("delete"), name),
        st.tuples(st.just("rename"), name, st.sampled_from(("blk.5.count", "blk.0.eps.x", "blk.x.eps", "eps"))))
    header, _ = safetensors_parts(path)
    return st.one_of(st.tuples(st.just("info"), json_mutations(info, ("format", "types", "n_layer", "dense_layers",
                                                                       "model"))),
                     st.tuples(st.just("arrays"), st.lists(array_ops, min_size=1, max_size=3)),
                     st.tuples(st.just("raw"), safetensors_mutations(header)))


def mutated_stats(path: Path, kind: str, mutations: list[tuple]) -> bytes:
    from mc_gguf.calibrate.stats import METADATA_KEY
    from mc_gguf.hf.safetensors_io import write_safetensors

    if kind == "raw":
        return mutated_safetensors(*safetensors_parts(path), mutations)
    info, arrays = stats_parts(path)
    metadata = {METADATA_KEY: json.dumps(info)}
    if kind == "info":
        metadata[METADATA_KEY] = mutated_json(info, mutations).decode("utf-8", "replace")
    for what, name, *how in mutations if kind == "arrays" else ():
        if name not in arrays:
            continue
        a = arrays[name]
        if what == "reshape" and a.ndim:
            axis = how[0] % a.ndim
            size = how[1]
            a = np.resize(np.moveaxis(a, axis, 0), (size, *np.moveaxis(a, axis, 0).shape[1:]))
            arrays[name] = np.ascontiguousarray(np.moveaxis(a, 0, axis))
        elif what == "dims":  # one more, or one fewer (a 1-D array becomes a scalar)
            arrays[name] = a[..., None] if how[0] == "add" else a.reshape(-1) if a.ndim > 1 else a.reshape(-1)[:1][0]
        elif what == "astype":
            with np.errstate(all="ignore"):
                arrays[name] = a.astype(how[0])
        elif what == "fill" and a.dtype.kind == "f":
            a = a.copy()
            a.reshape(-1)[: 1 if how[1] else a.size] = how[0]
            arrays[name] = a
        elif what == "delete":
            del arrays[name]
        elif what == "rename":
            arrays[how[0]] = arrays.pop(name)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stats"
        write_safetensors(out, {k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata)
        return out.read_bytes()


def test_stats_readers_refuse_mutated_statistics_cleanly(calibration, tiny_model_dir, work):
    """load_stats, then (when it reads them) allocate: a plan or an McGgufError."""
    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.calibrate.stats import load_stats

    stats_path, _ = calibration

    @fuzz_settings(command_line=False)
    @given(stats_mutations(stats_path))
    @example(("raw", [("dtype", "blk.0.slot_experts", "BF16")]))  # found by make fuzz: numpy reads no bfloat16
    def mutated(case):
        with scratch(work) as folder:
            path = folder / "tiny.stats"
            path.write_bytes(mutated_stats(stats_path, *case))
            before = digest(path)
            stats = tolerated(load_stats, path)
            if stats is not None:
                tolerated(allocate, stats, 3.0)
            assert digest(path) == before

    fuzz(mutated, "stats")


def test_allocate_allocates_or_refuses_mutated_statistics_in_one_line(calibration, tiny_model_dir, work):
    """allocate in a child process, the model folder named by the statistics."""
    stats_path, _ = calibration

    @fuzz_settings(command_line=True)
    @given(stats_mutations(stats_path))
    def example(case):
        with scratch(work) as folder:
            path = folder / "tiny.stats"
            path.write_bytes(mutated_stats(stats_path, *case))
            run_clean([path, tiny_model_dir], "allocate", str(path), "--bits", "3", "-o", str(folder / "plan.json"))

    fuzz(example, "stats_cli")
