"""Bad input ends early in one clear line; interrupted work resumes to the same result; outputs are normal files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from mc_gguf.cli import main
from mc_gguf.gguf_io.edit import MetadataDetails, float_array, float_value, rewrite_metadata

from conftest import CALIBRATION_TEXT

# ---------------------------------------------------------------- helpers


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("mc-gguf")]
    assert lines and any(all(n in line for n in needles) for line in lines), err


def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial") or p.name.endswith(".mc-gguf")]


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.fixture()
def text_file(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(CALIBRATION_TEXT)
    return path


# ------------------------------------------------- kill -9, then run again

# Runs mc-gguf with the command-line arguments after POINT, and kills itself with SIGKILL at that point.
KILLER = """
import os, signal, sys
point = sys.argv.pop(1)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def die_at_layer_1(owner, name, layer_arg):
    # args[layer_arg] of the function is the layer (calibrate_layer's third, ExpertQuantizer.__call__'s second)
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        if args[layer_arg] == 1:
            die()
        return real(*args, **kwargs)
    setattr(owner, name, wrapper)

import mc_gguf.calibrate.calibration as calibration
import mc_gguf.calibrate.stats as stats
import mc_gguf.quantize.experts as experts
if point == "embeddings":
    # half the embeddings written, then killed: the file must not be trusted
    real_embed = calibration.embed
    def embed(ckpt, sequences, hidden):
        real_embed(ckpt, sequences[: len(sequences) // 2], hidden)
        hidden.flush()
        die()
    calibration.embed = embed
elif point == "calibrating":
    die_at_layer_1(calibration, "calibrate_layer", 2)
elif point == "saving":
    stats.CalibrationStats.save = die
elif point == "quantizing":
    die_at_layer_1(experts.ExpertQuantizer, "__call__", 1)
from mc_gguf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed(point: str, args: list[str]) -> None:
    killed = subprocess.run([sys.executable, "-c", KILLER, point, *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


@pytest.mark.parametrize("point", ["embeddings", "calibrating", "saving"])
def test_calibration_killed_then_rerun_equals_an_uninterrupted_run(point, tiny_model_dir, tmp_path, calibration,
                                                                   calibration_settings, text_file):
    from mc_gguf.calibrate.stats import load_stats

    s = calibration_settings
    out = tmp_path / "killed.stats"
    args = ["calibrate", str(tiny_model_dir), "-o", str(out), "--text", str(text_file), "--tokens", str(s.n_tokens),
            "--seq-len", str(s.seq_len), "--seed", str(s.seed), "--eps-tokens", str(s.eps_tokens), "--types",
            *s.types, *(["--hessian"] if s.hessian else []), "-q"]
    run_killed(point, args)
    assert not out.exists()
    assert main(args) == 0
    resumed = load_stats(out)
    _, reference = calibration
    for a, b in zip(resumed.layers, reference.layers):
        for name in ("count", "weight_sum", "top_ratio", "imatrix_in", "imatrix_mid", "eps", "routed_ids",
                     "routed_weights"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{point}: {name}")
    for bid, _ in reference.moe_layers:
        np.testing.assert_array_equal(resumed.moe_input(bid), reference.moe_input(bid), err_msg=f"{point}: inputs")
    assert not (tmp_path / "killed.stats.partial.d").exists()
    assert no_leftovers(tmp_path) == []


# compress's defaults (tuning), with fewer sweeps: a resumed run measures no tuned error twice and tunes as the
# uninterrupted one did
COMPRESS_ARGS = ["--bits", "3", "--tokens", "1024", "--seq-len", "128", "--types", "Q2_K", "Q4_K", "Q8_0",
                 "--tune-iters", "2", "-q"]


@pytest.fixture(scope="module")
def compress_reference(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(calibration text, the GGUF an uninterrupted compress writes)."""
    folder = tmp_path_factory.mktemp("compress-reference")
    text = folder / "calib.txt"
    text.write_text(CALIBRATION_TEXT)
    out = folder / "out.gguf"
    assert main(["compress", str(tiny_model_dir), "--calib", str(text), *COMPRESS_ARGS, "-o", str(out)]) == 0
    return text, out


@pytest.mark.parametrize("point", ["calibrating", "quantizing"])
def test_compress_killed_then_rerun_writes_the_same_file(point, tiny_model_dir, tmp_path, compress_reference):
    text, reference = compress_reference
    out = tmp_path / "out.gguf"
    args = ["compress", str(tiny_model_dir), "--calib", str(text), *COMPRESS_ARGS, "-o", str(out)]
    run_killed(point, args)
    assert not out.exists()
    work = tmp_path / ".out.gguf.mc-gguf"
    if point == "quantizing":
        assert (work / "stats.safetensors").exists()  # the calibration was done
        assert list(tmp_path.glob(".out.gguf.*.partial")), "the killed write left its partial file"
    else:
        assert (work / "stats.safetensors.partial.d" / "layer-0.safetensors").exists()

    assert main(args) == 0
    assert out.read_bytes() == reference.read_bytes()
    assert no_leftovers(tmp_path) == []


def test_compress_interrupted_keeps_its_work_and_says_how_to_resume(tiny_model_dir, tmp_path, text_file, capsys,
                                                                   monkeypatch):
    import mc_gguf.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "allocate", interrupted)
    out = tmp_path / "out.gguf"
    code, err = run_cli(capsys, ["compress", str(tiny_model_dir), "--bits", "5", "--calib", str(text_file),
                                 "--tokens", "512", "--seq-len", "128", "--types", "Q4_K", "Q8_0", "--no-tune", "-q",
                                 "-o", str(out)])
    assert code == 130 and "the same command resumes it" in err
    assert (tmp_path / ".out.gguf.mc-gguf" / "stats.safetensors").exists()

    calls = []
    real = pipeline.calibrate
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("mc_gguf.calibrate.calibration.calibrate_layer",
                        lambda *a, **k: pytest.fail("a finished calibration was run again"))
    assert main(["compress", str(tiny_model_dir), "--bits", "5", "--calib", str(text_file), "--tokens", "512",
                 "--seq-len", "128", "--types", "Q4_K", "Q8_0", "--no-tune", "-q", "-o", str(out)]) == 0
    assert calls and out.exists() and no_leftovers(tmp_path) == []


def test_sigterm_is_handled_as_ctrl_c(tiny_model_dir, tmp_path):
    out = tmp_path / "out.gguf"
    code = ("import os, signal, sys\n"
            "calls = []\n"
            "from mc_gguf.gguf_io import convert as c\n"
            "real_encode = c.encode\n"
            "def encode(data, qtype, *importance):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 3:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real_encode(data, qtype, *importance)\n"
            "c.encode = encode\n"
            "from mc_gguf.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "convert", str(tiny_model_dir), "-o", str(out), "-q"],
                          capture_output=True, text=True)
    assert done.returncode == 130 and "interrupted" in done.stderr
    assert not out.exists() and no_leftovers(tmp_path) == []


def test_stale_partial_file_of_a_dead_process_is_removed_by_the_next_write(tiny_model_dir, tmp_path):
    out = tmp_path / "out.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.gguf.{int(dead.stdout)}.partial"
    stale.write_bytes(b"half a file")
    assert main(["convert", str(tiny_model_dir), "-o", str(out), "--type", "q8_0", "-q"]) == 0
    assert not stale.exists() and out.exists()


# ------------------------------------------------------------ file modes


def test_outputs_honour_the_umask_and_keep_an_existing_files_mode(tiny_model_dir, tmp_path):
    out = tmp_path / "out.gguf"
    old = os.umask(0o022)
    try:
        assert main(["convert", str(tiny_model_dir), "-o", str(out), "--type", "q8_0", "-q"]) == 0
        assert out.stat().st_mode & 0o777 == 0o644
        out.chmod(0o640)
        assert main(["convert", str(tiny_model_dir), "-o", str(out), "--type", "q8_0", "-q"]) == 0
        assert out.stat().st_mode & 0o777 == 0o640
        os.umask(0o077)
        other = tmp_path / "other.gguf"
        assert main(["convert", str(tiny_model_dir), "-o", str(other), "--type", "q8_0", "-q"]) == 0
        assert other.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_writing_to_a_symlink_writes_its_target(converted, tmp_path):
    from mc_gguf.prune.calibration import write_odp_metadata
    from mc_gguf.prune.rule import OdpParams

    target = tmp_path / "real.gguf"
    shutil.copyfile(converted("q8_0"), target)
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    write_odp_metadata(link, link, OdpParams([0.2, 0.3]))
    assert link.is_symlink() and link.resolve() == target
    assert "mc.odp.mu" in gguf.GGUFReader(target).fields


# ------------------------------------------------- bad values, refused early


@pytest.mark.parametrize("argv, needle", [
    (["calibrate", "MODEL", "-o", "OUT/s", "--tokens", "0"], "--tokens"),
    (["calibrate", "MODEL", "-o", "OUT/s", "--tokens", "-5"], "--tokens"),
    (["calibrate", "MODEL", "-o", "OUT/s", "--types", "FOO"], "unknown quantization type 'FOO'"),
    (["allocate", "STATS", "--bits", "nan", "-o", "OUT/p.json"], "--bits"),
    (["compress", "MODEL", "--bits", "2.5", "--odp-skip", "1.5", "-o", "OUT/c.gguf"], "--odp-skip"),
    (["run", "GGUF", "-p", "hi", "-n", "0"], "--max-tokens"),
    (["run", "GGUF", "-p", "hi", "--mu", "5"], "--mu"),
    (["run", "GGUF", "-p", "hi", "--mu", "nan"], "--mu"),
    (["eval", "GGUF", "--text", "TEXT", "--chunks", "0"], "--chunks"),
    (["odp-calibrate", "MODEL", "GGUF", "--text", "TEXT", "--skip", "1.5"], "--skip"),
])
def test_out_of_range_flags_are_refused_by_the_parser(argv, needle, capsys, tiny_model_dir, converted, tmp_path):
    values = {"MODEL": str(tiny_model_dir), "GGUF": str(converted("q8_0")), "STATS": "stats", "TEXT": "t.txt"}
    argv = [values.get(a, a.replace("OUT", str(tmp_path))) for a in argv]
    code, err = run_cli(capsys, argv)
    assert code == 2 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("extra, needle", [
    (["--odp-skip", "0.9"], "not reachable with top-2 routing"),
    (["--bits", "1.0"], "below the smallest"),
])
def test_compress_refuses_impossible_requests_before_calibrating(extra, needle, tiny_model_dir, tmp_path, capsys,
                                                                 monkeypatch):
    import mc_gguf.pipeline as pipeline

    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibrated before refusing"))
    argv = ["compress", str(tiny_model_dir), "--bits", "2.5", "-o", str(tmp_path / "c.gguf"), "-q", *extra]
    code, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, needle)
    assert no_leftovers(tmp_path) == []


@pytest.mark.parametrize("case, needle", [("skip", "not reachable with top-2"), ("gguf", "not a GGUF file"),
                                          ("output", "does not exist")])
def test_odp_calibrate_checks_everything_before_the_model_pass(case, needle, tiny_model_dir, converted, tmp_path,
                                                               text_file, capsys, monkeypatch):
    import mc_gguf.prune.calibration as calibration

    monkeypatch.setattr(calibration, "router_statistics", lambda *a, **k: pytest.fail("ran the model first"))
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF but not really")
    gguf_in = str(bad_gguf) if case == "gguf" else str(converted("q8_0"))
    out = tmp_path / ("missing/out.gguf" if case == "output" else "out.gguf")
    argv = ["odp-calibrate", str(tiny_model_dir), gguf_in, "--text", str(text_file), "-o", str(out)]
    if case == "skip":
        argv += ["--skip", "0.75"]
    code, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, needle)


# ------------------------------------------- bad files: one line, no abort


def test_expert_used_count_outside_the_experts_is_refused_not_an_abort(converted, tmp_path, capsys):
    for used in (0, 9):
        bad = rewrite_metadata(converted("q8_0"), tmp_path / f"used{used}.gguf",
                               {"llama.expert_used_count": MetadataDetails(gguf.GGUFValueType.UINT32, used)})
        code, err = run_cli(capsys, ["run", str(bad), "-p", "hi", "-n", "1"])
        assert_one_line_error(code, err, "expert_used_count", str(used))


def test_llama_cpps_own_reason_is_shown_when_it_refuses_a_file(converted, tmp_path, capsys):
    bad = rewrite_metadata(converted("q8_0"), tmp_path / "bad.gguf",
                           {"llama.embedding_length": MetadataDetails(gguf.GGUFValueType.UINT32, 128)})
    code, err = run_cli(capsys, ["run", str(bad), "-p", "hi", "-n", "1"])
    assert_one_line_error(code, err, "llama.cpp could not load it", "error loading model")


@pytest.mark.parametrize("updates, needle", [
    ({"mc.odp.mu": float_array([0.2, 0.3]), "mc.odp.protect_ratio": MetadataDetails(gguf.GGUFValueType.STRING, "0.1")},
     "mc.odp.protect_ratio must be a float32"),
    ({"mc.odp.mu": float_array([0.2, 0.3]), "mc.odp.mu_exps": float_array([0.2] * 5)},
     "mc.odp.mu_exps has 5 values but the model has 2 layers of 4 experts"),
    ({"mc.odp.mu": float_array([0.2, 0.3]), "mc.odp.mu_exps": float_array([0.2] * 7 + [1.5])},
     "mc.odp.mu_exps[1][3] = 1.5 is not in [0, 1]"),
    ({"mc.odp.mu": float_array([0.2, 0.3]), "mc.odp.renormalize": float_value(0.0)},
     "mc.odp.renormalize must be a bool"),
    ({"mc.experts.groups": MetadataDetails(gguf.GGUFValueType.ARRAY, [0.0] * 24, sub_type=gguf.GGUFValueType.FLOAT32)},
     "mc.experts.groups must be an array of int32"),
    ({"mc.experts.groups": MetadataDetails(gguf.GGUFValueType.STRING, "0000000")},
     "mc.experts.groups must be an array of int32"),
])
def test_metadata_of_the_wrong_type_is_named(updates, needle, converted, tmp_path, capsys):
    bad = rewrite_metadata(converted("q8_0"), tmp_path / "bad.gguf", updates)
    code, err = run_cli(capsys, ["run", str(bad), "-p", "hi", "-n", "1"])
    assert_one_line_error(code, err, needle)


def _plan_file(calibration, tiny_model_dir, tmp_path) -> Path:
    path = tmp_path / "plan.json"
    assert main(["allocate", str(calibration[0]), "--bits", "3", "-o", str(path), "--model", str(tiny_model_dir)]) == 0
    return path


@pytest.mark.parametrize("change, needles", [
    (lambda plan: plan["experts"][0][1].__setitem__("gate", None), ("layer 0 expert 1", "None")),
    (lambda plan: plan["experts"][1][0].__setitem__("down", 12), ("layer 1 expert 0", "12")),
    (lambda plan: plan["experts"][1].pop(), ("its layers have 4, 3 experts",)),
    (lambda plan: plan.__setitem__("experts", "Q4_K"), ("experts must be a list of layers",)),
    (lambda plan: plan["experts"][1].__setitem__(0, "Q4_K"), ("experts must be a list of layers",)),
    (lambda plan: plan["non_expert"].__setitem__("attn", 8), ("non_expert must be",)),
])
def test_bad_plans_are_named_where_they_are_wrong(change, needles, calibration, tiny_model_dir, tmp_path, capsys):
    path = _plan_file(calibration, tiny_model_dir, tmp_path)
    plan = json.loads(path.read_text())
    change(plan)
    path.write_text(json.dumps(plan))
    code, err = run_cli(capsys, ["quantize", str(tiny_model_dir), "--plan", str(path), "--stats",
                                 str(calibration[0]), "-o", str(tmp_path / "q.gguf"), "-q"])
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.pop("num_local_experts"), "num_local_experts must be a positive whole number"),
    (lambda c: c.pop("architectures"), "names no architecture"),
    (lambda c: c.__setitem__("num_experts_per_tok", 9), "more than the 4 experts"),
])
def test_bad_configs_are_named(change, needle, model_copy, tmp_path, capsys):
    config = json.loads((model_copy / "config.json").read_text())
    change(config)
    (model_copy / "config.json").write_text(json.dumps(config))
    code, err = run_cli(capsys, ["convert", str(model_copy), "-o", str(tmp_path / "o.gguf"), "-q"])
    assert_one_line_error(code, err, needle)


def test_a_shard_with_an_unknown_dtype_is_named(model_copy, tmp_path, capsys):
    import struct

    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "X99"
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    shard.write_bytes(data[:8] + raw + data[8 + n:])
    code, err = run_cli(capsys, ["convert", str(model_copy), "-o", str(tmp_path / "o.gguf"), "-q"])
    assert_one_line_error(code, err, shard.name, "X99")


def test_os_errors_are_one_line(converted, tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    code, err = run_cli(capsys, ["inspect", str(converted("q8_0")), "--plot", str(tmp_path / "missing" / "p.png")])
    assert_one_line_error(code, err, "does not exist")
    code, err = run_cli(capsys, ["inspect", str(tmp_path / "nothing.gguf")])
    assert_one_line_error(code, err, "no such file")
    if Path("/proc/self").is_dir():  # a folder no file can be created in, even by root
        code, err = run_cli(capsys, ["convert", str(tiny_model_dir), "-o",
                                     "/proc/out.gguf", "-q"])
        assert_one_line_error(code, err, "/proc/")


def test_unexpected_failures_say_how_to_see_the_traceback(capsys, monkeypatch, converted):
    import mc_gguf.gguf_io.inspect as inspect_module

    monkeypatch.setattr(inspect_module, "inspect_gguf", lambda path: {}["boom"])
    code, err = run_cli(capsys, ["inspect", str(converted("q8_0"))])
    assert code == 1 and "KeyError" in err and "--debug" in err and "Traceback" not in err
    code, err = run_cli(capsys, ["--debug", "inspect", str(converted("q8_0"))])
    assert code == 1 and "Traceback" in err


def test_an_unknown_non_expert_type_is_named_before_the_statistics_are_read(capsys, tmp_path):
    code, err = run_cli(capsys, ["allocate", str(tmp_path / "missing.stats"), "--bits", "3", "-o",
                                 str(tmp_path / "p.json"), "--tensor-type", "attn=BAR"])
    assert_one_line_error(code, err, "attn=BAR", "Q8_0")


def test_a_plan_in_lower_case_writes_the_file_of_its_canonical_spelling(calibration, tiny_model_dir, tmp_path):
    """Type names in any case ("q4_k") are ggml's types: the file is the very file of the plan as allocate spells
    it, names of expert groups and mc.plan.types included."""
    import hashlib

    path = _plan_file(calibration, tiny_model_dir, tmp_path)
    plan = json.loads(path.read_text())
    lower = tmp_path / "lower.json"
    lower.write_text(json.dumps({**plan, "experts": [[{p: t.lower() for p, t in e.items()} for e in layer]
                                                     for layer in plan["experts"]],
                                 "non_expert": {k: v.lower() for k, v in plan["non_expert"].items()}}))
    files = []
    for plan_path in (path, lower):
        out = tmp_path / f"{plan_path.stem}.gguf"
        assert main(["quantize", str(tiny_model_dir), "--plan", str(plan_path), "--stats", str(calibration[0]),
                     "--no-gptq", "-q", "-o", str(out)]) == 0
        files.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert files[0] == files[1]


def test_compress_resumed_on_statistics_without_mean_outputs_says_so(tiny_model_dir, tmp_path, text_file, capsys,
                                                                      monkeypatch):
    """A work folder whose statistics an earlier mc-gguf made (no skip_mean arrays) is resumed as it is, and the
    run says that its file prunes without the mean outputs and how to get them."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    import mc_gguf.pipeline as pipeline

    monkeypatch.setattr(pipeline, "allocate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "out.gguf"
    args = ["compress", str(tiny_model_dir), "--bits", "5", "--calib", str(text_file), "--tokens", "512",
            "--seq-len", "128", "--types", "Q4_K", "Q8_0", "--no-tune", "--odp-skip", "0.25", "-q", "-o", str(out)]
    assert run_cli(capsys, args)[0] == 130
    stats = tmp_path / ".out.gguf.mc-gguf" / "stats.safetensors"
    with safe_open(stats, "np") as f:
        metadata = f.metadata()
        names = list(f.keys())
        arrays = {k: f.get_tensor(k) for k in names if not k.endswith(".skip_mean")}
    assert len(arrays) < len(names)
    save_file(arrays, stats, metadata=metadata)
    monkeypatch.undo()
    code, err = run_cli(capsys, args)
    assert code == 0 and "predate pruning's mean outputs" in err and out.exists()
    from mc_gguf.gguf_io.layout import odp_mean_name
    assert odp_mean_name(0) not in {t.name for t in gguf.GGUFReader(out).tensors}
