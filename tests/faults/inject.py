"""Fault injection for the tests: run an export in a forked child and make it die (SIGKILL,
nothing runs after), raise, or hit a full disk at a chosen call of a chosen function.

    status = run_in_child(lambda: moeq.export(...), at(writer, "save_file", 3, "kill"))

The product code has no hooks: a fault is a wrapper put on a module attribute in the
child only, so the parent (the test) never sees it. `status` says how the child ended, so a
test can assert that the fault really fired.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from pathlib import Path

KILLED, RAISED, FINISHED = "killed", "raised", "finished"


class InjectedFault(Exception):
    pass


def _act(action: str, name: str):
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        raise InjectedFault(f"injected at {name}")
    if action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device")
    raise ValueError(action)


def at(obj, attr: str, nth: int, action: str, *, after: bool = False, when=None):
    """A patch to apply in the child: the `nth` call of `obj.attr` (counting only calls for
    which `when(*args, **kwargs)` is true) does `action` before the real call, or after it
    returned (`after=True`)."""

    def apply():
        real = getattr(obj, attr)
        count = [0]

        def wrapper(*args, **kwargs):
            hit = when is None or when(*args, **kwargs)
            if hit:
                count[0] += 1
            if hit and count[0] == nth and not after:
                _act(action, attr)
            res = real(*args, **kwargs)
            if hit and count[0] == nth and after:
                _act(action, attr)
            return res

        setattr(obj, attr, wrapper)

    return apply


def run_in_child(fn, *patches) -> str:
    """Fork; in the child apply the patches and run fn. -> KILLED / RAISED / FINISHED."""
    if not hasattr(os, "fork"):
        import pytest

        pytest.skip("needs os.fork (POSIX)")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            for p in patches:
                p()
            fn()
        except InjectedFault:
            code = 3
        except BaseException:
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, status
        return KILLED
    code = os.WEXITSTATUS(status)
    assert code in (0, 3), f"the child failed on its own (exit {code}); see its traceback above"
    return RAISED if code == 3 else FINISHED


def dst_is(path: Path):
    """`when` for os.replace / os.rename / os.link: the call's destination is `path`."""
    return lambda src, dst, *a, **k: Path(dst) == Path(path)


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under d (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def assert_same_files(got: Path, want: Path) -> None:
    a, b = snapshot(got), snapshot(want)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for k in a:
        assert a[k] == b[k], f"{k} differs"
