"""Which exceptions are the user's to fix. The CLI prints these as one line (exit 2) and
shows a traceback only for anything else (a bug) or with --debug."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    from .export.outdir import ExportError
    from .interception import UnsupportedExpertsOp
    from .resume_state import PartialRunBusy
    from .targets import CoverageError

    # ValueError: bad arguments, configs, data; OSError subclasses: paths the user named
    return (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            CoverageError, UnsupportedExpertsOp, NotImplementedError, ExportError, PartialRunBusy)


def __getattr__(name: str):
    if name == "USER_ERRORS":  # resolved lazily: targets/interception import torch
        return _user_errors()
    raise AttributeError(name)
