"""Which exceptions are the user's to fix. The CLI prints these as one line (exit 2) and
shows a traceback only for anything else (a bug) or with --debug."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Resolved on call: targets / interception import torch, which --help must not load."""
    from .checkpoint.outdir import ExportError
    from .interception import UnsupportedExpertsOp
    from .resume_state import PartialRunBusy
    from .targets import CoverageError

    # ValueError: bad arguments, configs, data; OSError subclasses: paths the user named
    return (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            CoverageError, UnsupportedExpertsOp, NotImplementedError, ExportError, PartialRunBusy)

