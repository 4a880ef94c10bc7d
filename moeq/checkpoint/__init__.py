"""Checkpoint export (ModelOpt and compressed-tensors layouts) and loading back."""

from .export import ExportReport, export
from .load import load
from .outdir import ExportError, check_out_dir

__all__ = ["ExportError", "ExportReport", "check_out_dir", "export", "load"]
