"""Fixtures for the calibration-algorithm tests: the quantize tests' pristine tiny models."""

from __future__ import annotations

from quantize.conftest import _one_thread, pristine  # noqa: F401
