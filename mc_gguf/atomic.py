"""Write outputs under a temporary name, fsync, rename: never a half-written file, always a normal one.

``atomic_output`` gives the file the mode a plain ``open(path, "w")`` would
(0666 less the umask, usually 0644), or the mode of the file it replaces;
writing to a symbolic link replaces the link's target, not the link; the
data and then the folder are fsync'd around the rename. The temporary name
holds the writer's process id (``.NAME.<pid>.partial``), so a later write
to the same output removes what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from mc_gguf.errors import OutputPathError


def check_output_path(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """The output path, or a clear error when its folder does not exist or is not writable, when it exists and is
    not a regular file (a device, a FIFO, a socket: replacing one by a file would destroy it), when it is a loop
    of symbolic links, or when it is one of ``inputs`` or inside an input folder (writing would destroy the
    input the command reads)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {path}: folder {parent} does not exist")
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a folder")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write {path}: folder {parent} is not writable")
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):  # Python raises RuntimeError on a loop of links
        raise OutputPathError(f"cannot write {path}: it is a loop of symbolic links") from None
    if path.is_symlink():
        if resolved.is_symlink() or not resolved.parent.is_dir():
            raise OutputPathError(f"cannot write {path}: it is a loop of symbolic links or points nowhere")
        check_output_path(resolved)
    if resolved.exists() and not resolved.is_file():
        raise OutputPathError(f"cannot write {path}: it exists and is not a regular file (a device, a FIFO or a "
                              "socket); choose a file name")
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source:
            raise OutputPathError(f"cannot write {path}: it is this command's input; choose another file name")
        if source.is_dir() and source in resolved.parents:
            raise OutputPathError(f"cannot write {path}: it is inside the input folder {source}, whose files the "
                                  "command reads; choose a path outside it")
    if len(resolved.name.encode()) > _name_max(resolved.parent):
        raise OutputPathError(f"cannot write {path}: its name is longer than this file system allows "
                              f"({_name_max(resolved.parent)} bytes)")
    return path


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _partial_name(target: Path, pid: int | None = None) -> str:
    """The temporary name beside ``target``: ``.NAME.<pid>.partial``, NAME shortened (with a hash of the whole,
    so that two long names do not meet) where the whole would pass the file system's limit on names."""
    pid = os.getpid() if pid is None else pid
    name = target.name
    limit = _name_max(target.parent) - len("..partial") - 11  # a pid of up to 10 digits and its dot
    if len(name.encode()) > limit:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name.encode()[:max(1, limit - 13)].decode(errors='ignore')}~{digest}"
    return f".{name}.{pid}.partial"


def current_umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(target: Path) -> int:
    """The permission bits the output gets: the replaced file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove ``.NAME.<pid>.partial`` files beside ``target`` whose writing process is gone."""
    stem = _partial_name(target, 0)[1:-len(".0.partial")]
    pattern = re.compile(rf"^\.{re.escape(stem)}\.(\d+)\.partial$")
    removed = []
    for candidate in target.parent.glob(f".{glob.escape(stem)}.*.partial"):
        match = pattern.match(candidate.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds.

    On any exception (Ctrl-C included) the temporary file is removed and ``path``
    is left as it was. A ``path`` that is a symbolic link keeps being one: its
    target is replaced.
    """
    path = check_output_path(path)
    target = path.resolve() if path.is_symlink() else path
    remove_stale_partials(target)
    tmp = target.parent / _partial_name(target)
    tmp.unlink(missing_ok=True)
    mode = output_mode(target)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        fsync_folder(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
