"""Test-suite wide settings: one torch thread. The tiny models here are latency-bound;
on a 2-core CI machine a second thread mostly adds scheduling waits."""

import torch

torch.set_num_threads(1)
