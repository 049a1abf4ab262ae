"""What a user may name as a model: a folder, a Hugging Face cache folder, or a Hub repository id.

``model_folder`` turns each into the folder of files the stages read:
- a model folder (config.json and safetensors): itself;
- a cache folder ``models--ORG--NAME`` (HF_HOME/hub's layout: ``refs/main`` names the snapshot in
  ``snapshots/``): the snapshot ``refs/main`` names, or the only one;
- ``ORG/NAME`` or ``ORG/NAME@REVISION`` that is no path here: huggingface_hub's ``snapshot_download``, which
  honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN, and fetches only what the stages read (config
  and tokenizer files, safetensors shards, the model card).

``model_name`` is the name a converted file carries (general.name's source): the repository's name for a
snapshot of the cache, whose folder is named by a commit hash, else the folder's name.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mc_gguf.errors import CheckpointError

# what the stages read of a repository (snapshot_download's allow_patterns)
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "README.md", "LICENSE*"]
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
CACHE_FOLDER = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>.+)$")


def model_folder(ref: str | Path) -> Path:
    """The model folder ``ref`` names (see the module's docstring), or a clear error."""
    path = Path(ref)
    if path.is_dir():
        if CACHE_FOLDER.match(path.name) and (path / "snapshots").is_dir() and not (path / "config.json").exists():
            return _cache_snapshot(path)
        return path
    if path.exists():
        raise CheckpointError(f"{path}: not a folder (a model is a folder with config.json and safetensors shards, "
                              "or a Hugging Face id such as mistralai/Mixtral-8x7B-v0.1)")
    match = REPO_ID.match(str(ref))
    if match is None:
        raise CheckpointError(f"{ref}: no such folder, and not a Hugging Face id (ORG/NAME or ORG/NAME@REVISION)")
    return _download(match["repo"], match["revision"])


def _cache_snapshot(folder: Path) -> Path:
    """The snapshot of a cache folder that ``refs/main`` names, else its only snapshot."""
    ref = folder / "refs" / "main"
    snapshots = sorted(p for p in (folder / "snapshots").iterdir() if p.is_dir())
    if ref.is_file():
        snapshot = folder / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    if len(snapshots) == 1:
        return snapshots[0]
    if not snapshots:
        raise CheckpointError(f"{folder}: a Hugging Face cache folder without a snapshot (an interrupted download?)")
    raise CheckpointError(f"{folder}: a Hugging Face cache folder with {len(snapshots)} snapshots and no refs/main; "
                          f"name one: {', '.join(str(s) for s in snapshots[:3])}")


def _download(repo: str, revision: str | None) -> Path:
    """``repo`` at ``revision`` from the Hub, or from the cache alone when HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}@{revision}" if revision else repo
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise CheckpointError(f"{where}: the repository is gated; accept its terms on huggingface.co and log in "
                              "(`hf auth login`, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where}: no such repository on the Hugging Face Hub (or it is private: log in "
                              "with `hf auth login`, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: the repository has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else "the Hub cannot be reached and " \
              "it is not in the cache"
        raise CheckpointError(f"{where}: cannot get it: {why} ({_cache_dir()})") from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{where}: cannot get it from the Hugging Face Hub ({exc})") from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def model_name(folder: Path) -> str:
    """The model's name: the repository's name for a snapshot of the Hub cache, else the folder's name."""
    resolved = folder.resolve() if folder.exists() else folder
    parts = resolved.parts
    if len(parts) >= 3 and parts[-2] == "snapshots":
        match = CACHE_FOLDER.match(parts[-3])
        if match:
            return match["name"]
    return resolved.name


def repo_id(folder: Path) -> str | None:
    """``ORG/NAME`` of a snapshot of the Hub cache, else None."""
    parts = (folder.resolve() if folder.exists() else folder).parts
    if len(parts) >= 3 and parts[-2] == "snapshots":
        match = CACHE_FOLDER.match(parts[-3])
        if match:
            return f"{match['org']}/{match['name']}"
    return None


@contextlib.contextmanager
def named_folder(folder: Path) -> Iterator[Path]:
    """``folder`` under the model's name: itself where its name is the model's, else a temporary folder named
    so, of links to its files. llama.cpp's converter and gguf-py's ``Metadata`` name a model after its
    folder (basename, size label, version, fine-tune), as a ``git clone`` of the repository is named; a
    snapshot's folder is named by a commit hash."""
    name = model_name(folder)
    if folder.resolve().name == name:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="mc-gguf-") as scratch:
        view = Path(scratch) / name
        view.mkdir()
        for item in folder.iterdir():
            (view / item.name).symlink_to(item.resolve())
        yield view


def gguf_file(ref: str | Path, filename: str | None = None) -> Path:
    """A GGUF file from what a user names: a path, or a Hub repository ``ORG/NAME[@REVISION]`` of GGUFs with
    ``filename`` the one to use (fetched into the cache by hf_hub_download; without ``filename``, the
    repository's one .gguf file, or a clear error listing them)."""
    path = Path(ref)
    if path.exists() or filename is None and not REPO_ID.match(str(ref)):
        return path  # the loader says what is wrong with it
    match = REPO_ID.match(str(ref))
    if match is None:
        raise CheckpointError(f"{ref}: no such file, and not a Hugging Face id (ORG/NAME or ORG/NAME@REVISION)")
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    repo, revision = match["repo"], match["revision"]
    try:
        if filename is None:
            names = sorted(n for n in list_repo_files(repo, revision=revision) if n.endswith(".gguf"))
            if len(names) != 1:
                listed = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
                raise CheckpointError(f"{ref}: name the file to load (filename=...): the repository holds "
                                      f"{len(names)} GGUF files{': ' + listed if names else ''}")
            filename = names[0]
        return Path(hf_hub_download(repo, filename, revision=revision))
    except EntryNotFoundError:
        raise CheckpointError(f"{ref}: the repository has no file {filename}") from None
    except OfflineModeIsEnabled:
        raise CheckpointError(f"{ref}: HF_HUB_OFFLINE is set, so its files cannot be listed: name the file to "
                              "load (filename=...)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{ref}: cannot get {filename or 'its file list'}: the Hub cannot be reached or "
                              f"HF_HUB_OFFLINE is set, and it is not in the cache ({_cache_dir()})") from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{ref}: cannot get it from the Hugging Face Hub ({exc})") from None
