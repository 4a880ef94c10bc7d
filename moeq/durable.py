"""Durable file writes: what is on disk after a crash is either the old file or the new one.

    write_atomic(dir / "progress.json", data)   # temp file + fsync + rename + fsync(dir)

A rename is atomic on POSIX file systems, and fsync before it makes the new contents reach
the disk before the name does; fsync of the directory makes the rename itself durable.
Files get the permissions of an ordinary `open()` (0666 minus the umask), whatever the
library that wrote them chose (safetensors writes 0600).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def umask() -> int:
    """The process umask (os.umask can only be read by setting it)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def normal_mode(path: Path, is_dir: bool = False) -> None:
    """Set the mode a plain mkdir / open would have given."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the names in `path` (renames, new files) durable. No-op where directories cannot
    be opened (not POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (e.g. certain network mounts) refuse fsync on directories
    finally:
        os.close(fd)


def write_atomic(path: Path, data: "bytes | str") -> None:
    """Replace `path` with `data` atomically and durably; the temp file is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.part")
    if isinstance(data, str):
        data = data.encode()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync `tmp`, give it normal permissions, rename it to `path`, fsync the directory."""
    fsync_file(tmp)
    normal_mode(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (before a directory is renamed into place)."""
    for d, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(d) / name)
        fsync_dir(Path(d))
