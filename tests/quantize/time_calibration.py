"""Calibration time of the tiny Qwen3.5-MoE under each experts implementation.

    python tests/quantize/time_calibration.py [--threads N] [--repeats R]

8 batches of 4 x 64 tokens, recipe nvfp4. Prints, per implementation, moeq's calibration
seconds (QuantReport.calib_seconds, best of R) next to the unquantized forward over the
same batches, and the ratio. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_models as tm  # noqa: E402

import moeq  # noqa: E402

IMPLS = ("eager", "batched_mm", "grouped_mm")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="qwen3_5_moe")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = tm.tiny_model(args.model, experts_implementation="grouped_mm")
    calib = [tm.random_input_ids(base, 4, 64, seed=s) for s in range(8)]
    print(f"{args.model}: 8 batches x 4 x 64 tokens, nvfp4, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print(f"{'implementation':<14}{'calibration s':>15}{'plain fwd s':>13}{'ratio':>8}")
    for impl in IMPLS:
        cal, plain = [], []
        for _ in range(args.repeats):
            m = copy.deepcopy(base)
            m.set_experts_implementation(impl)
            with torch.no_grad():
                t0 = time.perf_counter()
                for ids in calib:
                    m(input_ids=ids, use_cache=False)
                plain.append(time.perf_counter() - t0)
            report = moeq.quantize(m, "nvfp4", calib, progress=False)
            cal.append(report.calib_seconds)
        c, p = min(cal), min(plain)
        print(f"{impl:<14}{c:>15.3f}{p:>13.3f}{c / p:>8.2f}")


if __name__ == "__main__":
    main()
