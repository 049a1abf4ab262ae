"""Hugging Face ids and cache folders wherever a model folder is taken, resolved offline from a cache laid out by
hand as huggingface_hub lays it out (models--ORG--NAME/{blobs,refs/main,snapshots/HASH}); the file is named after
the repository, not the snapshot's commit hash; general.file_type names the type holding most expert bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from mc_gguf.errors import CheckpointError
from mc_gguf.gguf_io.header import scan
from mc_gguf.gguf_io.metadata import file_type_of
from mc_gguf.gguf_io.write import OutputTensor
from mc_gguf.hf.hub import model_folder, model_name

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLDER = "fedcba9876543210fedcba9876543210fedcba98"


def lay_out_cache(hf_home: Path, repo: str, model: Path, commits=(COMMIT,), main: str | None = COMMIT) -> Path:
    """``model``'s files as a snapshot (or several) of ``repo`` in the hub cache under ``hf_home``."""
    org, name = repo.split("/")
    folder = hf_home / "hub" / f"models--{org}--{name}"
    blobs = folder / "blobs"
    blobs.mkdir(parents=True)
    for commit in commits:
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for item in model.iterdir():
            blob = blobs / f"{item.name}-{commit[:6]}"
            shutil.copy(item, blob)
            (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    if main:
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(main)
    return folder


def offline_env(hf_home: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def mc_gguf(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mc_gguf", *argv], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_a_hub_id_converts_offline_from_the_cache_and_names_the_file_after_the_repository(tiny_model_dir, tmp_path):
    hf_home = tmp_path / "hf"
    lay_out_cache(hf_home, "mistralai/Mixtral-8x7B-v0.1", tiny_model_dir)
    out = tmp_path / "from-id.gguf"
    result = mc_gguf(["convert", "mistralai/Mixtral-8x7B-v0.1", "-o", str(out), "-q"], offline_env(hf_home))
    assert result.returncode == 0, result.stderr[-2000:]
    by_id = scan(out)
    assert by_id.fields["general.name"] == "Mixtral 8x7B v0.1"  # gguf-py's Metadata on the repository's name
    assert by_id.fields["general.basename"] == "Mixtral" and by_id.fields["general.version"] == "v0.1"
    # the same tensors as the folder's own conversion (an independent path to the same files)
    folder_out = tmp_path / "from-folder.gguf"
    assert mc_gguf(["convert", str(tiny_model_dir), "-o", str(folder_out), "-q"], dict(os.environ)).returncode == 0
    by_folder = scan(folder_out)
    assert [(t.name, t.shape, t.type) for t in by_id.tensors] == [(t.name, t.shape, t.type) for t in by_folder.tensors]
    start = lambda h: h.data_offset  # noqa: E731
    assert out.read_bytes()[start(by_id):] == folder_out.read_bytes()[start(by_folder):]


def test_cache_folders_and_revisions_resolve_to_their_snapshots(tiny_model_dir, tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    folder = lay_out_cache(hf_home, "org/Tiny-MoE", tiny_model_dir, commits=(COMMIT, OLDER))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert model_folder(folder) == folder / "snapshots" / COMMIT      # refs/main
    assert model_folder(folder / "snapshots" / OLDER) == folder / "snapshots" / OLDER
    assert model_folder("org/Tiny-MoE").resolve() == (folder / "snapshots" / COMMIT).resolve()
    assert model_folder(f"org/Tiny-MoE@{OLDER}").resolve() == (folder / "snapshots" / OLDER).resolve()
    assert model_name(folder / "snapshots" / OLDER) == "Tiny-MoE"
    (folder / "refs" / "main").unlink()
    with pytest.raises(CheckpointError, match="2 snapshots and no refs/main"):
        model_folder(folder)


@pytest.mark.parametrize("ref, needle", [
    ("org/not-in-the-cache", "HF_HUB_OFFLINE is set and it is not in the cache"),
    ("not a path or an id", "no such folder, and not a Hugging Face id"),
])
def test_ids_that_cannot_be_resolved_are_one_line(ref, needle, tmp_path):
    result = mc_gguf(["convert", ref, "-o", str(tmp_path / "o.gguf"), "-q"], offline_env(tmp_path / "hf"))
    lines = [line for line in result.stderr.splitlines() if line.startswith("mc-gguf: error:")]
    assert result.returncode == 1 and len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
    assert "this is a bug" not in result.stderr


def test_llama_cpps_converter_names_a_snapshot_after_its_repository(tmp_path):
    """The families llama.cpp's converter handles: it names the model after its folder, so the snapshot is shown
    to it under the repository's name."""
    from mc_gguf.hf.tiny import build_tiny_family

    model = build_tiny_family("qwen3moe", tmp_path / "qwen")
    hf_home = tmp_path / "hf"
    lay_out_cache(hf_home, "Qwen/Qwen3-30B-A3B", model)
    out = tmp_path / "qwen.gguf"
    result = mc_gguf(["convert", "Qwen/Qwen3-30B-A3B", "-o", str(out), "-q"], offline_env(hf_home))
    assert result.returncode == 0, result.stderr[-2000:]
    fields = scan(out).fields
    assert fields["general.basename"] == "Qwen3" and COMMIT not in fields["general.name"], fields["general.name"]


def test_the_file_type_is_the_type_holding_most_expert_bytes():
    def tensor(name: str, qtype: gguf.GGMLQuantizationType, rows: int) -> OutputTensor:
        return OutputTensor(name, (rows, 256), qtype, lambda: None)

    Q = gguf.GGMLQuantizationType
    tensors = [tensor("token_embd.weight", Q.Q8_0, 10_000),  # not an expert: ignored
               tensor("blk.0.ffn_down_exps.g0.weight", Q.Q2_K, 300),
               tensor("blk.0.ffn_down_exps.g1.weight", Q.Q4_K, 200),  # 200 x 144 B > 300 x 84 B
               tensor("blk.0.ffn_gate_exps.weight", Q.IQ2_XS, 100)]
    assert file_type_of(tensors) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert file_type_of(tensors[:2]) == gguf.LlamaFileType.MOSTLY_Q2_K
    assert file_type_of([tensor("blk.0.ffn_up_exps.weight", Q.IQ2_XS, 1)]) == gguf.LlamaFileType.MOSTLY_IQ2_XS
    assert file_type_of(tensors[:1]) == gguf.LlamaFileType.GUESSED
