"""Measured quality of every preset on the demo model: perplexity, KL and top-1 agreement
against the unquantized model on the held-out split. Prints the README's quality table.

    python scripts/quality_table.py [--samples 64] [--eval-samples 64] [--seq-len 256]
    python scripts/quality_table.py --presets nvfp4,w4a16-int4 --algorithm max,mse,gptq,mse+gptq

Same data path as `moeq quantize --eval`: calibration on moeq/demo/calib.txt, evaluation
on moeq/demo/eval.txt (disjoint files), both cut into non-overlapping windows.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers

import moeq
from moeq import data as D
from moeq.evaluate import compare


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--presets", default=",".join(moeq.PRESETS), help="comma-separated presets (default: all)")
    ap.add_argument("--algorithm", default="max",
                    help="comma-separated calibration algorithms to compare (max, awq, mse, gptq, mse+gptq, awq+gptq, ...)")
    a = ap.parse_args(argv)
    algorithms = a.algorithm.split(",")
    tok = transformers.AutoTokenizer.from_pretrained(D.DEMO_MODEL)
    base = transformers.AutoModelForCausalLM.from_pretrained(D.DEMO_MODEL, dtype=getattr(torch, a.dtype)).eval()
    calib = D.batches(D.token_windows(tok, D.read_text(D.DEMO_CALIB), a.seq_len, a.samples), a.batch_size)
    evalb = D.batches(D.token_windows(tok, D.read_text(D.DEMO_EVAL), a.seq_len, a.eval_samples), a.batch_size)
    rows = []
    for preset in a.presets.split(","):
        for alg in algorithms:
            t = time.perf_counter()
            m = copy.deepcopy(base)
            rep = moeq.quantize(m, preset, calib, progress=False, algorithm=alg)
            r = compare(base, m, evalb)
            calib_s = rep.calib_seconds + rep.algorithm_seconds
            rows.append((preset, alg, r, calib_s))
            print(f"{preset} {alg}: {r.as_dict()} calibration {calib_s:.1f}s ({time.perf_counter() - t:.0f}s)", flush=True)
    show_alg = algorithms != ["max"]
    head = "| preset |" + (" algorithm |" if show_alg else "")
    print(f"\n{head} perplexity | Δ ppl | KL(base‖quant) nats/token | top-1 agreement |"
          + (" calibration s |" if show_alg else "") + "\n|---|" + ("---|" if show_alg else "") + "---|---|---|---|"
          + ("---|" if show_alg else ""))
    print(f"| unquantized ({a.dtype}) |" + (" |" if show_alg else "") + f" {rows[0][2].ppl_base:.3f} | — | — | — |"
          + (" |" if show_alg else ""))
    for preset, alg, r, calib_s in rows:
        print(f"| {preset} |" + (f" {alg} |" if show_alg else "")
              + f" {r.ppl_quant:.3f} | {r.ppl_quant - r.ppl_base:+.3f} | {r.kl:.4f} | {100 * r.top1_agreement:.1f}% |"
              + (f" {calib_s:.1f} |" if show_alg else ""))
    print(f"\n{rows[0][2].tokens} evaluated tokens; command: python scripts/quality_table.py "
          f"--samples {a.samples} --eval-samples {a.eval_samples} --seq-len {a.seq_len}"
          + (f" --presets {a.presets} --algorithm {a.algorithm}" if show_alg else ""))


if __name__ == "__main__":
    main()
