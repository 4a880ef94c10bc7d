"""The output directory: which paths an export may be written to, and how it lands there.

    out = check_out_dir(out, source=model_dir, overwrite=False)   # before any work: raises with the fix
    with AtomicDir(out, overwrite, source=model_dir) as tmp:       # write into tmp
        ...                                                        # renamed to out on success

Invariants (shared by the in-memory `moeq.export` and `quantize_streaming`):
- `overwrite` only replaces a directory moeq wrote (it holds `moeq_export.json` naming a
  recipe and a layout) or an empty one; never a file, and never a path that is, contains
  or lies inside the source model (symlinks resolved). Everything else is refused.
- An export is assembled in `.<out>.moeq-tmp-<host>-<pid>-<random>` next to `out` and
  renamed into place only when complete and fsynced; a crash leaves `out` as it was.
  Temp dirs of dead processes (same host, pid gone) are removed by the next run.
- Files and directories get the permissions of plain `open` / `mkdir` (umask applied).
- A full disk is reported as `ExportError`: one line with the path and what to do.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import socket
from pathlib import Path

from ..durable import fsync_dir, fsync_tree, normal_mode

log = logging.getLogger("moeq")

MARKER = "moeq_export.json"  # the export's sidecar: written last, and only by moeq
TMP_TAG, OLD_TAG = ".moeq-tmp-", ".moeq-old-"


class ExportError(OSError):
    """Writing the export failed for a reason outside moeq (a full disk); str() is one line
    that says what to do."""

    def __init__(self, message: str, code: "int | None" = None):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


_DISK_FULL_CODES = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# safetensors' Rust writer and torch's zip writer do not raise OSError: match their text
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(e: "BaseException | None") -> bool:
    """True when `e` or an exception it was raised from is a full disk / exhausted quota."""
    for _ in range(16):
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in _DISK_FULL_CODES:
            return True
        if isinstance(e, Exception) and any(s in str(e) for s in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(e: BaseException, where: Path, then: str = "re-run") -> ExportError:
    return ExportError(f"no space left on the device of {where} while writing the export: free space there and {then}",
                       errno.ENOSPC)


def is_moeq_export(path: Path) -> bool:
    """A directory moeq wrote: its sidecar names a recipe and a layout."""
    try:
        d = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "recipe" in d and "layout" in d


def _within(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def check_out_dir(out: "str | os.PathLike", source: "str | os.PathLike | None" = None, overwrite: bool = False) -> Path:
    """-> the resolved output path, or raise (FileExistsError / ValueError) saying what to do.

    `source`: the model directory the export is made from (None or a hub id: not checked).
    Call it before loading the model so a mistake costs nothing; export and streaming call
    it again before writing and before the final rename."""
    res = Path(os.path.abspath(out)).resolve()
    if source is not None and Path(source).exists():
        src = Path(source).resolve()
        if _within(res, src) or _within(src, res):
            what = "is" if res == src else ("lies inside" if _within(res, src) else "contains")
            raise ValueError(f"output path {out} {what} the source model {source}: moeq never writes into (or replaces) "
                             f"the model it reads; choose an output directory outside it")
    for anc in res.parents:
        if anc.exists():
            if not anc.is_dir():
                raise FileExistsError(f"output path {out}: {anc} is a file, not a directory; choose another path")
            break
    if res.exists():
        if not res.is_dir():
            raise FileExistsError(f"output path {out} is an existing file; moeq writes a directory and never replaces "
                                  f"a file: choose another path or remove the file")
        if any(res.iterdir()):
            if not overwrite:
                raise FileExistsError(f"output directory {out} exists and is not empty; choose another path or pass "
                                      f"overwrite=True (moeq quantize --overwrite)")
            if not is_moeq_export(res):
                raise FileExistsError(f"output directory {out} is not empty and was not written by moeq (it has no "
                                      f"{MARKER}); overwrite only replaces moeq's own exports: choose another path, or "
                                      f"empty or remove that directory yourself")
    return res


def _owner_tag() -> str:
    return f"{socket.gethostname().replace('/', '_')}-{os.getpid()}-{secrets.token_hex(4)}"


def make_temp_dir(out: Path) -> Path:
    """`.<out>.moeq-tmp-<host>-<pid>-<random>` next to out (same file system, so the final
    rename is atomic), with the permissions of a plain mkdir."""
    tmp = out.parent / f".{out.name}{TMP_TAG}{_owner_tag()}"
    os.mkdir(tmp)
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the temp / set-aside dirs of `out` left by killed runs on this host. -> removed."""
    host, removed = socket.gethostname().replace("/", "_"), []
    if not out.parent.is_dir():
        return removed
    prefix = f".{out.name}"
    for p in out.parent.iterdir():
        for tag in (TMP_TAG, OLD_TAG):
            if not p.name.startswith(prefix + tag):
                continue
            parts = p.name[len(prefix + tag):].rsplit("-", 2)
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
                log.warning("removing %s, left by a killed moeq run (pid %s)", p, parts[1])
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _normalize_modes(root: Path) -> None:
    for d, dirs, files in os.walk(root):
        normal_mode(Path(d), is_dir=True)
        for name in files:
            normal_mode(Path(d) / name)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE). -> False where the
    kernel, libc or file system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def publish(tmp: Path, out: Path, overwrite: bool = False, source=None) -> None:
    """Rename the finished export `tmp` to `out` (replacing an old moeq export when
    `overwrite`), after giving it normal permissions and fsyncing it. Where the system can
    swap directories atomically, `out` is at every instant the old export or the new one."""
    out = check_out_dir(out, source, overwrite)  # again: the path may have changed while we worked
    _normalize_modes(tmp)
    fsync_tree(tmp)
    if out.exists():  # an empty directory or a moeq export (checked above)
        if _exchange(tmp, out):
            fsync_dir(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old one
            return
        old = out.parent / f".{out.name}{OLD_TAG}{_owner_tag()}"  # a kill from here to the rename: no `out`
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, out)
    fsync_dir(out.parent)


class AtomicDir:
    """`with AtomicDir(out, overwrite, source=model_dir) as tmp:` write into tmp; renamed to
    out on success, removed on any exception (a full disk becomes `ExportError`)."""

    def __init__(self, out: "str | os.PathLike", overwrite: bool = False, source=None):
        self.given, self.overwrite, self.source = out, overwrite, source
        self.out = check_out_dir(out, source, overwrite)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.out)
        self.tmp = make_temp_dir(self.out)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                publish(self.tmp, self.out, self.overwrite, self.source)
                return False
            except BaseException as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if is_disk_full(e):
                    raise disk_full_error(e, self.out) from e
                raise
        shutil.rmtree(self.tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(exc, self.out) from exc
        return False
