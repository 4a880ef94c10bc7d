"""Calibration time of each algorithm against max, side by side in one process: `moeq.quantize`
wall time on a fresh deep copy of the model per run, in the order given (name max first and last
to see the drift). Prints each run, then the mean seconds and ratio to max per algorithm.

    python scripts/algorithm_timing.py --algorithm max,gptq,mse,awq,mse+gptq,max
    python scripts/algorithm_timing.py --samples 16 --dtype bfloat16 --preset w4a16-int4 --algorithm max,gptq,max

Calibration: the demo's calib split cut into --samples windows of --seq-len tokens, batches of
8 (the CLI's defaults: 64 x 256). The compiled input kernel of issue 16 switches on after
moeq.fused.PAYBACK_NUMEL eager elements; its one-time compilation lands in whichever run crosses
it (set MOEQ_COMPILE=1 or 0 to take it out of the comparison).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers

import moeq
from moeq import data as D


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(D.DEMO_MODEL))
    ap.add_argument("--preset", default="nvfp4")
    ap.add_argument("--algorithm", default="max,mse,awq,gptq,max", help="comma-separated runs, in order")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args(argv)
    runs = a.algorithm.split(",")
    if "max" not in runs:
        raise SystemExit("--algorithm must include max (the reference)")
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    base = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).eval()
    calib = D.batches(D.token_windows(tok, D.read_text(D.DEMO_CALIB), a.seq_len, a.samples), 8)
    secs: dict[str, list[float]] = {}
    for alg in runs:
        m = copy.deepcopy(base)
        t = time.perf_counter()
        rep = moeq.quantize(m, a.preset, calib, progress=False, algorithm=alg)
        secs.setdefault(alg, []).append(time.perf_counter() - t)
        print(f"{alg}: {secs[alg][-1]:.1f}s (algorithm's own {rep.algorithm_seconds:.1f}s)", flush=True)
        del m
    mean = {k: sum(v) / len(v) for k, v in secs.items()}
    print(f"\n{a.preset}, {a.samples} x {a.seq_len} tokens, {a.dtype}: "
          + ", ".join(f"{k} {v:.1f}s = {v / mean['max']:.2f}x" for k, v in mean.items()))
    return mean


if __name__ == "__main__":
    main()
