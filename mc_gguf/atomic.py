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
import errno
import fcntl
import glob
import hashlib
import os
import re
import shutil
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
    target is replaced. The output is locked for the block (``output_lock``); a
    full disk is a clear error.
    """
    path = check_output_path(path)
    target = path.resolve() if path.is_symlink() else path
    with output_lock(target):
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
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if _disk_full(exc, target.parent):
                raise OutputPathError(f"cannot write {path}: no space left on the device of {target.parent} "
                                      f"({_free_bytes(target.parent) / 1e6:.1f} MB free)") from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _disk_full(exc: OSError, folder: Path) -> bool:
    """Did a write fail for want of space (ENOSPC, or numpy's tofile "N requested and M written", which carries
    no errno)?"""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and "requested and" in str(exc)
                                                            and _free_bytes(folder) < (1 << 24))


def check_free_space(folder: Path, nbytes: int, what: str) -> None:
    """A clear error before the work when ``folder``'s device has less than ``nbytes`` free."""
    free = _free_bytes(folder)
    if nbytes > free:
        raise OutputPathError(f"{what} needs {nbytes / 1e9:.2f} GB and the device of {folder} has "
                              f"{free / 1e9:.2f} GB free")


def reserve_space(f, nbytes: int, what: str) -> None:
    """Allocate the blocks of an open file (an int descriptor or a file object) up to ``nbytes`` before it is
    written through a memory map: a write into a hole of a sparse file on a full disk is SIGBUS, while this
    fails with a clear error."""
    fd = f if isinstance(f, int) else f.fileno()
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return
    except AttributeError:  # platforms without posix_fallocate (macOS): zeros written below
        pass
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OutputPathError(f"{what}: no space left on the device ({nbytes / 1e9:.2f} GB needed)") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    size = os.fstat(fd).st_size
    chunk = bytes(1 << 20)
    try:
        for start in range(size, nbytes, len(chunk)):  # blocks past the end only: the file's bytes stay
            os.pwrite(fd, chunk[:min(len(chunk), nbytes - start)], start)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OutputPathError(f"{what}: no space left on the device ({nbytes / 1e9:.2f} GB needed)") from None
        raise


# outputs this process holds locked: resolved path -> (descriptor of the lock file, depth)
_held_locks: dict[Path, list[int]] = {}


def lock_path(target: Path) -> Path:
    return target.parent / _partial_name(target, 0).replace(".0.partial", ".lock")


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on an output for the block (flock on ``.NAME.lock`` beside it, holding the
    writer's process id), so that a second mc-gguf writing the same output (or its work folder) is refused with
    the process that holds it instead of removing the first one's work. The lock goes with the process, even
    one killed; the lock file is removed when the block ends. Nested blocks of one process share the lock."""
    target = Path(path).resolve()
    held = _held_locks.get(target)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    lock = lock_path(target)
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputPathError(f"cannot write {path}: another mc-gguf{holder} is writing it; wait until it "
                                  "ends, or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its last holder removed after this process opened it
            break
        os.close(fd)
    else:
        raise OutputPathError(f"cannot write {path}: its lock file {lock} keeps changing")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[target] = [fd, 1]
    try:
        yield
    finally:
        del _held_locks[target]
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return ""
    return f" (process {pid})"


def work_folder(out: str | Path) -> Path:
    """Where compress and quantize keep their work (statistics, plan, experts quantized by a cluster) until
    ``out`` is written: ``.OUT.mc-gguf`` beside it, so that the same command started again resumes it."""
    out = Path(out)
    return out.parent / f".{out.name}.mc-gguf"
