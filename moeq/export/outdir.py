"""Output-directory safety: what `overwrite` may replace.

An export replaces a directory only when moeq wrote it (it holds the `moeq_export.json`
sidecar every export writes), and never when the directory is, contains or lies inside
the source model, whatever `overwrite` says.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER = "moeq_export.json"


def check_out_dir(out: "str | os.PathLike", source: "str | os.PathLike | None" = None, overwrite: bool = False) -> None:
    """Raise (NotADirectoryError / ValueError / FileExistsError, each naming the fix) unless
    writing `out` can lose nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} is a file; choose a directory path for --out")
    if source is not None:
        o, s = out.resolve(), Path(source).resolve()
        if o == s or s in o.parents or o in s.parents:
            how = "is" if o == s else ("lies inside" if s in o.parents else "contains")
            raise ValueError(f"output {out} {how} the source model {source}; writing there could destroy it: "
                             f"choose an --out outside the model directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} exists and is not empty; choose another --out or pass --overwrite")
        if not (out / MARKER).is_file():
            raise FileExistsError(f"output directory {out} is not empty and was not written by moeq (no {MARKER}); "
                                  f"--overwrite only replaces moeq exports: choose another --out or empty it yourself")
