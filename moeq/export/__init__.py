"""Checkpoint export (ModelOpt and compressed-tensors layouts) and loading back."""

from .export import ExportReport, export
from .load import load

__all__ = ["ExportReport", "export", "load"]
