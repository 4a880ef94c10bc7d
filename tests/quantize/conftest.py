"""Fixtures for the moeq.quantize tests: pristine tiny models built once per session.

`pristine(model_type)` returns the cached model; tests never quantize it (quantize mutates
in place) and take `helpers.fresh(...)` deep copies instead. A model whose plain tiny
forward fails (tests/tiny_models.py is maintained elsewhere) is skipped with the error.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from .helpers import tm


@functools.cache
def _build(model_type: str):
    try:
        m = tm.tiny_model(model_type, experts_implementation="grouped_mm", seed=0)
        with torch.no_grad():
            m(input_ids=tm.random_input_ids(m, 1, 8), use_cache=False)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return m


def _get(model_type: str):
    m = _build(model_type)
    if isinstance(m, str):
        pytest.skip(f"tiny {model_type} model: plain forward fails ({m}); tests/tiny_models.py owns the config")
    return m


@pytest.fixture(scope="session")
def pristine():
    return _get


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    # The CI box has 2 shared cores; tiny matmuls run faster single-threaded.
    n, hf_log = torch.get_num_threads(), logging.getLogger("transformers")
    level = hf_log.level
    torch.set_num_threads(1)
    hf_log.setLevel(logging.ERROR)  # kernel-fallback notices of the tiny hybrid models
    yield
    torch.set_num_threads(n)
    hf_log.setLevel(level)
