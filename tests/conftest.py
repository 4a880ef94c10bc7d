"""Test-suite wide settings: one torch thread. The tiny models here are latency-bound;
on a 2-core CI machine a second thread mostly adds scheduling waits."""

import torch

torch.set_num_threads(1)

# moeq compiles its fake-quant kernels (moeq/fused.py); each graph costs seconds on a CI
# machine, so the suite runs them eagerly unless MOEQ_COMPILE is set. tests/formats/test_fused.py
# turns compiling on for its bit-exactness checks.
import os  # noqa: E402

os.environ.setdefault("MOEQ_COMPILE", "0")
