#!/usr/bin/env python3
"""Does the mc-gguf patch series apply to another llama.cpp? A rebase check, patch by patch.

Exports a llama.cpp tree into a temporary folder, then applies patches/*.patch
to it in name order, each on top of the ones before it that applied, the way
mc_gguf/runtime/source.py (apply_patches) applies them to the pinned sdist:
`git apply` at the root of the llama.cpp tree, paths stripped of their a/ and
b/ (-p1). For each patch:

1. `git apply --check`: if it passes, the patch is applied; its status is
   "clean", or "applies with offset/fuzz" when a hunk landed at another line
   (git's "Hunk #N succeeded at L (offset K lines)").
2. Only with --fuzz N (off by default): otherwise with reduced context
   (`git apply -C(3-N)`: up to N of the three context lines on each side may
   differ, as GNU patch's fuzz factor): "applies with offset/fuzz", method
   "fuzz". A fuzzed hunk can land in the wrong place (a one-line context
   matches many), so read such a patch's result before trusting it.
3. Otherwise a 3-way merge (`git apply --3way`), when the blobs the patch was
   made against are known here (see --base): a clean merge is applied
   ("applies with offset/fuzz", method "3way"); a merge with conflicts names
   the files that conflict.
4. Otherwise, or after a conflicted merge: "conflicts". `git apply --reject`
   then finds the hunks that fail, reported per file with the first line of
   each hunk header ("@@ -1652,7 +1652,13 @@ static void ..."), and the tree
   is put back as it was: a patch that conflicts is not applied, so a later
   patch that builds on it may fail too ("after_failed" names the earlier
   unapplied patches that touch the same files, overall and per conflicting
   file: such a conflict may be a consequence). "already_in_tree" is true
   when the patch reverses cleanly: the tree has its change already.

SOURCE is any of:
- a llama.cpp source tree (a folder with ggml/ and src/);
- a llama-cpp-python sdist, unpacked (its vendor/llama.cpp is used) or as
  its .tar.gz;
- a git directory, bare or not (e.g. a snapshot of ggml-org/llama.cpp), with
  --rev (default HEAD for a bare one; a work tree without --rev is copied as
  it is). The revision's files are written out from the object database; a
  snapshot that lacks some blobs (large files) still exports, and the paths
  it lacks are listed under source.missing_blobs.
Paths in the patches are relative to the llama.cpp root (mc-gguf makes them
against the sdist's vendor/llama.cpp and applies them from that folder), so
they apply to a plain upstream tree as they are; patches whose paths start
with vendor/llama.cpp/ are stripped of it (-p3).

--base names the tree the patches were made against (normally the pinned
sdist, ~/.cache/mc-gguf/sdist/llama_cpp_python-0.3.36.tar.gz): the series is
applied there first (its own report is included, every patch should be
clean), and every file version it passes through is stored in the temporary
repository, so that --3way has the blobs the patches' "index" lines name.
Without --base a 3-way merge is possible only if those blobs are in SOURCE.

Prints one JSON object: the source (and its commit when it is a git
revision), per patch {name, status, method, files, offsets, conflicts,
three_way, after_failed} and totals. Exit status: 0 when every patch
applies, 1 when some conflict, 2 on bad input (one line on stderr).

    python scripts/rebase_check.py ~/.cache/mc-gguf/sdist/llama_cpp_python-0.3.36.tar.gz
    python scripts/rebase_check.py /path/to/llama.cpp.git --rev master \\
        --base ~/.cache/mc-gguf/sdist/llama_cpp_python-0.3.36.tar.gz --json build/rebase_report.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Where llama-cpp-python vendors llama.cpp (mc_gguf.runtime.source.VENDOR_DIR).
VENDOR_DIR = "vendor/llama.cpp"
PATCHES_DIR = Path(__file__).resolve().parent.parent / "patches"

CLEAN, OFFSET_FUZZ, CONFLICTS = "clean", "applies with offset/fuzz", "conflicts"

# git apply's messages (git 2.x, C locale)
CHECKING = re.compile(r"^Checking patch (.+)\.\.\.$")
OFFSET = re.compile(r"^Hunk #(\d+) succeeded at (\d+)(?: \(offset (-?\d+) lines?\))?\.$")
APPLYING = re.compile(r"^Applying patch (.+) with (\d+) rejects?\.\.\.$")
REJECTED = re.compile(r"^Rejected hunk #(\d+)\.$")
CONFLICTED = re.compile(r"^Applied patch to '(.+)' with conflicts\.$")
ERROR_FILE = re.compile(r"^error: (?:patch failed: )?(.+?)(?::\d+)?: (.+)$")
PATCH_FAILED = re.compile(r"^error: patch failed: (.+):(\d+)$")


class InputError(Exception):
    """Bad input: reported as one line, without a traceback."""


@dataclass
class FilePatch:
    """One file of a patch: its path in the tree (after stripping), and its hunks' header lines."""

    path: str
    old_path: str | None
    new_file: bool
    preimage: str | None  # the abbreviated blob id of the "index" line
    hunks: list[str] = field(default_factory=list)


@dataclass
class Patch:
    path: Path
    strip: int
    files: list[FilePatch]

    @property
    def name(self) -> str:
        return self.path.name

    def paths(self) -> list[str]:
        out = []
        for f in self.files:
            for p in (f.old_path, f.path):
                if p and p not in out:
                    out.append(p)
        return out

    def hunks_of(self, path: str) -> list[str]:
        return next((f.hunks for f in self.files if path in (f.path, f.old_path)), [])


def git(args: list[str], cwd: Path, check: bool = False, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C", GIT_CEILING_DIRECTORIES=str(cwd.parent), GIT_TERMINAL_PROMPT="0")
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(var, None)
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, input=stdin)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"git {' '.join(args[:3])} failed: {detail[-1] if detail else result.returncode}")
    return result


def parse_patch(path: Path) -> Patch:
    """The files and hunk headers of a `git format-patch` file; the -p level that makes its paths tree-relative."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from e
    files: list[FilePatch] = []
    current: FilePatch | None = None
    for line in text.splitlines():
        if line.startswith("diff --git "):
            m = re.match(r"^diff --git a/(\S+) b/(\S+)$", line)
            if not m:
                raise InputError(f"{path.name}: cannot read the header {line!r}")
            current = FilePatch(path=m.group(2), old_path=m.group(1), new_file=False, preimage=None)
            files.append(current)
        elif current is None:
            continue
        elif line.startswith("new file mode"):
            current.new_file, current.old_path = True, None
        elif line.startswith("index ") and not current.hunks:
            m = re.match(r"^index ([0-9a-f]+)\.\.[0-9a-f]+", line)
            if m and set(m.group(1)) != {"0"}:
                current.preimage = m.group(1)
        elif line.startswith("@@ "):
            current.hunks.append(line)
    if not files:
        raise InputError(f"{path.name}: no 'diff --git' in it, not a patch")
    strip = 1
    if all(f.path.startswith(VENDOR_DIR + "/") for f in files):
        strip = 1 + VENDOR_DIR.count("/") + 1
        for f in files:
            f.path = f.path[len(VENDOR_DIR) + 1:]
            if f.old_path:
                f.old_path = f.old_path[len(VENDOR_DIR) + 1:]
    return Patch(path=path, strip=strip, files=files)


def _extract_tar(stream, dest: Path) -> None:
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        try:
            archive.extractall(dest, filter="tar")
        except TypeError:  # Python without extraction filters
            archive.extractall(dest)


def _is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def _llama_cpp_root(tree: Path, what: str) -> Path:
    """The llama.cpp folder in an exported tree: the tree itself, vendor/llama.cpp, or one folder down."""
    candidates = [tree, tree / VENDOR_DIR]
    subdirs = [p for p in tree.iterdir() if p.is_dir()] if tree.is_dir() else []
    if len(subdirs) == 1:  # an sdist archive unpacks into one folder
        candidates += [subdirs[0], subdirs[0] / VENDOR_DIR]
    for c in candidates:
        if (c / "ggml").is_dir() and (c / "src").is_dir():
            return c
    if any((c / VENDOR_DIR).is_dir() for c in candidates):
        raise InputError(f"{what}: its {VENDOR_DIR} is empty (a git checkout of llama-cpp-python "
                         "without its submodule?)")
    raise InputError(f"{what} does not look like a llama.cpp tree (no ggml/ and src/ in it)")


def _export_git(git_dir: Path, commit: str, dest: Path) -> list[str]:
    """Write the files of ``commit`` under ``dest``, like `git archive` but going on past missing blobs.

    A partial snapshot (large files left out, say) still exports; the paths of the blobs it lacks are
    returned. Submodules are left out, as `git archive` does.
    """
    env = dict(os.environ, LC_ALL="C")
    listing = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "-z", "--full-tree", commit],
                             capture_output=True, env=env)
    if listing.returncode != 0:
        raise InputError(f"cannot list {commit} in {git_dir}: {listing.stderr.decode(errors='replace').strip()}")
    entries = []
    for record in listing.stdout.split(b"\0"):
        if record:
            meta, _, name = record.partition(b"\t")
            mode, kind, sha = meta.decode().split()
            if kind == "blob":
                entries.append((mode, sha, name.decode("utf-8", errors="surrogateescape")))
    missing = []
    with subprocess.Popen(["git", "--git-dir", str(git_dir), "cat-file", "--batch"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, env=env) as cat:
        for mode, sha, name in entries:
            cat.stdin.write(sha.encode() + b"\n")
            cat.stdin.flush()
            header = cat.stdout.readline().split()
            if len(header) < 3 or header[1] != b"blob":
                missing.append(name)
                continue
            data = cat.stdout.read(int(header[2]))
            cat.stdout.read(1)  # the newline after the content
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if mode == "120000":
                os.symlink(data.decode("utf-8", errors="surrogateescape"), target)
            else:
                target.write_bytes(data)
                if mode == "100755":
                    target.chmod(0o755)
        cat.stdin.close()
    return missing


def export_source(source: str, rev: str | None, dest: Path) -> tuple[Path, dict]:
    """Copy SOURCE (tree, sdist folder or archive, git dir at --rev) to ``dest``: its llama.cpp root, a description."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"{source}: no such file or folder")
    info: dict = {"path": str(path)}
    dest.mkdir(parents=True)
    if path.is_file():
        if rev:
            raise InputError(f"--rev is for a git directory, and {source} is a file")
        if not tarfile.is_tarfile(path):
            raise InputError(f"{source} is neither a folder nor a tar archive")
        info["kind"] = "archive"
        with open(path, "rb") as f:
            _extract_tar(f, dest)
        return _llama_cpp_root(dest, source), info

    git_dir = path if _is_git_dir(path) else path / ".git" if (path / ".git").is_dir() else None
    if git_dir is not None and (rev or git_dir == path):
        rev = rev or "HEAD"
        resolved = git(["--git-dir", str(git_dir), "rev-parse", "--verify", "--quiet", rev + "^{commit}"], cwd=path)
        if resolved.returncode != 0:
            raise InputError(f"{source}: no commit {rev!r} there")
        commit = resolved.stdout.strip()
        shown = git(["--git-dir", str(git_dir), "log", "-1", "--format=%cI%x09%s", commit], cwd=path)
        date, _, subject = shown.stdout.strip().partition("\t")
        info.update(kind="git", rev=rev, commit=commit, date=date, subject=subject)
        missing = _export_git(git_dir, commit, dest)
        if missing:
            info["missing_blobs"] = missing
        return _llama_cpp_root(dest, f"{source} at {rev}"), info
    if rev:
        raise InputError(f"--rev is for a git directory, and {source} is not one")

    info["kind"] = "tree"
    root = _llama_cpp_root(path, source)
    if root != path:
        info["llama_cpp"] = str(root)
    shutil.copytree(root, dest / "tree", symlinks=True, ignore=shutil.ignore_patterns(".git"))
    return dest / "tree", info


class Tree:
    """The exported llama.cpp tree as a git repository whose index follows every applied patch (--3way needs it)."""

    def __init__(self, root: Path):
        self.root = root
        for leftover in root.rglob(".git"):  # a submodule's gitlink file, say
            if leftover.is_file():
                leftover.unlink()
        git(["init", "-q"], cwd=root, check=True)
        git(["config", "core.autocrlf", "false"], cwd=root, check=True)
        git(["add", "-A", "-f", "."], cwd=root, check=True)

    def apply(self, patch: Patch, *extra: str) -> subprocess.CompletedProcess:
        return git(["apply", f"-p{patch.strip}", "-v", *extra, str(patch.path)], cwd=self.root)

    def apply_checked(self, patch: Patch, *extra: str) -> None:
        """Apply a patch that --check accepted, to the work tree and the index."""
        result = self.apply(patch, "--index", *extra)
        if result.returncode != 0:
            detail = result.stderr.strip().splitlines()
            raise RuntimeError(f"{patch.name} passed --check but did not apply: {detail[-1] if detail else ''}")

    def missing_blobs(self, patch: Patch) -> list[str]:
        """The preimage blobs the patch names that this repository lacks (or cannot tell apart)."""
        wanted = [f.preimage for f in patch.files if f.preimage and not f.new_file]
        if not wanted:
            return []
        found = git(["cat-file", "--batch-check"], cwd=self.root, stdin="\n".join(wanted) + "\n")
        return [w for w, line in zip(wanted, found.stdout.splitlines()) if line.split()[1:2] != ["blob"]]

    def store(self, files: list[Path]) -> None:
        """Write these files' contents into the object database (3-way merges look up preimages there)."""
        existing = [str(f) for f in files if f.is_file()]
        if existing:
            git(["hash-object", "-w", "--no-filters", "--stdin-paths"], cwd=self.root,
                stdin="\n".join(existing) + "\n", check=True)

    def snapshot(self) -> str:
        return git(["write-tree"], cwd=self.root, check=True).stdout.strip()

    def restore(self, snapshot: str, paths: list[str]) -> None:
        """Put ``paths`` (and the index) back as they were at ``snapshot``; remove .rej files and new files."""
        git(["read-tree", snapshot], cwd=self.root, check=True)
        tracked = set(git(["ls-files", "-z", "--", *paths], cwd=self.root).stdout.split("\0")) - {""}
        if tracked:
            git(["checkout-index", "-f", "-q", "--", *sorted(tracked)], cwd=self.root, check=True)
        for p in paths:
            leftovers = [self.root / (p + ".rej"), self.root / (p + ".orig")]
            if p not in tracked:  # created by the patch
                leftovers.append(self.root / p)
            for leftover in leftovers:
                if leftover.is_file() or leftover.is_symlink():
                    leftover.unlink()
        # read-tree drops the index's stat data: refresh it, or `git apply --index` finds every file changed
        git(["update-index", "-q", "--refresh"], cwd=self.root)


def _per_file(output: str) -> list[tuple[str | None, str]]:
    """git apply -v output lines, each with the file it was talking about."""
    current, out = None, []
    for line in output.splitlines():
        m = CHECKING.match(line) or APPLYING.match(line)
        if m:
            current = m.group(1)
        out.append((current, line))
    return out


def offsets_of(output: str) -> list[dict]:
    found = []
    for path, line in _per_file(output):
        m = OFFSET.match(line)
        if m and m.group(3) and int(m.group(3)) != 0:
            found.append({"file": path, "hunk": int(m.group(1)), "at_line": int(m.group(2)),
                          "offset": int(m.group(3))})
    return found


def failed_hunks(patch: Patch, reject_output: str, check_output: str) -> list[dict]:
    """Per file, why it fails and which hunks (their header's first line), from `git apply --reject -v`."""
    conflicts: dict[str, dict] = {}

    def entry(path: str) -> dict:
        return conflicts.setdefault(path, {"file": path, "reason": None, "hunks": []})

    for path, line in _per_file(reject_output):
        m = REJECTED.match(line)
        if m and path:
            hunks = patch.hunks_of(path)
            n = int(m.group(1))
            entry(path)["hunks"].append(hunks[n - 1] if 0 < n <= len(hunks) else f"hunk #{n}")
            entry(path)["reason"] = entry(path)["reason"] or "hunks do not match"
    # whole-file failures (missing file, new file already there, mode): every hunk of the file fails
    for line in (reject_output + "\n" + check_output).splitlines():
        if PATCH_FAILED.match(line) or not line.startswith("error: "):
            continue
        m = ERROR_FILE.match(line)
        if not m:
            continue
        path, reason = m.group(1), m.group(2)
        if path not in patch.paths() or reason == "patch does not apply":
            continue
        e = entry(path)
        if e["reason"] in (None, "hunks do not match") and not e["hunks"]:
            e["reason"] = reason
            e["hunks"] = list(patch.hunks_of(path)) or ["(whole file)"]
    if not conflicts:  # git said nothing we could place: name the files it checked
        for line in check_output.splitlines():
            m = PATCH_FAILED.match(line)
            if m:
                entry(m.group(1))["reason"] = f"patch failed at line {m.group(2)}"
    return [c for c in conflicts.values()]


def apply_series(tree: Tree, patches: list[Patch], store_into: Tree | None = None, fuzz: int = 0) -> list[dict]:
    """Apply ``patches`` in order; a patch that does not apply is left out. One report entry per patch."""
    report = []
    failed: list[Patch] = []
    for patch in patches:
        if store_into is not None:  # the preimages, for a later 3-way merge elsewhere
            store_into.store([tree.root / p for p in patch.paths()])
        entry: dict = {"name": patch.name, "files": patch.paths()}
        check = tree.apply(patch, "--check")
        if check.returncode == 0:
            tree.apply_checked(patch)
            offsets = offsets_of(check.stderr + check.stdout)
            entry.update(status=OFFSET_FUZZ if offsets else CLEAN, method="offset" if offsets else "exact")
            if offsets:
                entry["offsets"] = offsets
        else:
            context = f"-C{3 - fuzz}"
            fuzzed = tree.apply(patch, "--check", context) if fuzz else None
            if fuzzed is not None and fuzzed.returncode == 0:
                tree.apply_checked(patch, context)
                entry.update(status=OFFSET_FUZZ, method="fuzz", fuzz=fuzz,
                             offsets=offsets_of(fuzzed.stderr + fuzzed.stdout))
            else:
                entry.update(_conflicting(tree, patch, check.stderr + check.stdout))
        if entry["status"] == CONFLICTS:
            touched = set(patch.paths())
            entry["after_failed"] = [p.name for p in failed if touched & set(p.paths())]
            for conflict in entry["conflicts"]:  # per file: may it fail only because an earlier patch did?
                conflict["after_failed"] = [p.name for p in failed if conflict["file"] in p.paths()]
            failed.append(patch)
        if store_into is not None and entry["status"] != CONFLICTS:
            store_into.store([tree.root / p for p in patch.paths()])
        report.append(entry)
    return report


def _conflicting(tree: Tree, patch: Patch, check_output: str) -> dict:
    """A patch that does not apply (nor with --fuzz): try a 3-way merge, else report its failing hunks."""
    snapshot = tree.snapshot()
    missing = tree.missing_blobs(patch)
    three_way: dict
    if missing:
        three_way = {"tried": False, "why": f"{len(missing)} preimage blob(s) not in this repository (see --base)"}
    else:
        merged = tree.apply(patch, "--3way")
        output = merged.stderr + merged.stdout
        if merged.returncode == 0:
            return {"status": OFFSET_FUZZ, "method": "3way", "three_way": {"tried": True, "conflicted_files": []}}
        conflicted = [m.group(1) for _, line in _per_file(output) if (m := CONFLICTED.match(line))]
        three_way = {"tried": True, "conflicted_files": conflicted}
        tree.restore(snapshot, patch.paths())
    # the change may be there already (landed upstream, or applied before): then it reverses cleanly
    already = tree.apply(patch, "--check", "-R").returncode == 0
    rejected = tree.apply(patch, "--reject")
    conflicts = failed_hunks(patch, rejected.stderr + rejected.stdout, check_output)
    tree.restore(snapshot, patch.paths())
    return {"status": CONFLICTS, "method": "none", "conflicts": conflicts, "three_way": three_way,
            "already_in_tree": already}


def totals(report: list[dict]) -> dict:
    count = {s: sum(e["status"] == s for e in report) for s in (CLEAN, OFFSET_FUZZ, CONFLICTS)}
    return {"patches": len(report), "clean": count[CLEAN], "offset_or_fuzz": count[OFFSET_FUZZ],
            "conflicts": count[CONFLICTS], "applied": count[CLEAN] + count[OFFSET_FUZZ],
            "conflicting": [e["name"] for e in report if e["status"] == CONFLICTS]}


def load_patches(folder: Path) -> list[Patch]:
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    files = sorted(folder.glob("*.patch"))
    if not files:
        raise InputError(f"{folder}: no *.patch files in it")
    return [parse_patch(p) for p in files]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="llama.cpp tree, llama-cpp-python sdist (folder or .tar.gz), or git directory")
    parser.add_argument("--rev", help="the revision to export when SOURCE is a git directory (default: HEAD)")
    parser.add_argument("--base", help="the tree the patches were made against (any SOURCE form; a git directory "
                                       "at HEAD): enables 3-way merges and reports the series on it too")
    parser.add_argument("--patches", default=str(PATCHES_DIR), help=f"the patch series (default: {PATCHES_DIR})")
    parser.add_argument("--fuzz", type=int, choices=(0, 1, 2), default=0,
                        help="context lines per side a hunk may miss (default 0: exact context, offsets only)")
    parser.add_argument("--keep", help="leave the patched tree here (a new folder) instead of deleting it")
    parser.add_argument("--json", help="also write the JSON report to this file")
    args = parser.parse_args()

    if shutil.which("git") is None:
        parser.exit(2, f"{parser.prog}: error: git is not on PATH\n")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.exit(2, f"{parser.prog}: error: --json {args.json}: its folder does not exist\n")
    if args.keep and (Path(args.keep).exists() or not Path(args.keep).resolve().parent.is_dir()):
        parser.exit(2, f"{parser.prog}: error: --keep {args.keep} must be a new folder in an existing one\n")
    started = time.perf_counter()
    try:
        patches = load_patches(Path(args.patches).expanduser())
        with tempfile.TemporaryDirectory(prefix="rebase-check-") as tmp:
            root, info = export_source(args.source, args.rev, Path(tmp) / "source")
            target = Tree(root)
            result: dict = {"source": info, "patches_dir": str(Path(args.patches).expanduser().resolve())}
            if args.base:
                base_root, base_info = export_source(args.base, None, Path(tmp) / "base")
                base_report = apply_series(Tree(base_root), patches, store_into=target, fuzz=args.fuzz)
                result["base"] = {**base_info, "totals": totals(base_report),
                                  "not_clean": [e for e in base_report if e["status"] != CLEAN]}
            report = apply_series(target, patches, fuzz=args.fuzz)
            result.update(fuzz=args.fuzz, patches=report, totals=totals(report),
                          seconds=round(time.perf_counter() - started, 1))
            if args.keep:
                shutil.move(str(root), args.keep)
                result["kept"] = str(Path(args.keep).resolve())
    except (InputError, RuntimeError, OSError, tarfile.TarError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0 if result["totals"]["conflicts"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
