from __future__ import annotations

import pytest
import torch

from .helpers import Zoo


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny models' ops are far too small to split; on a busy 2-core machine torch's intra-op threads
    made this suite ~20x slower (each op waits for a descheduled worker). Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    """Quantized tiny models and their exports, shared by every export test of the session."""
    return Zoo(tmp_path_factory.mktemp("exports"))
