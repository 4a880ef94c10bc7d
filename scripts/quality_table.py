"""Measured quality of every preset on the demo model: perplexity, KL and top-1 agreement
against the unquantized model on the held-out split. Prints the README's quality table.

    python scripts/quality_table.py [--samples 64] [--eval-samples 64] [--seq-len 256]

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
    a = ap.parse_args(argv)
    tok = transformers.AutoTokenizer.from_pretrained(D.DEMO_MODEL)
    base = transformers.AutoModelForCausalLM.from_pretrained(D.DEMO_MODEL, dtype=getattr(torch, a.dtype)).eval()
    calib = D.batches(D.token_windows(tok, D.read_text(D.DEMO_CALIB), a.seq_len, a.samples), a.batch_size)
    evalb = D.batches(D.token_windows(tok, D.read_text(D.DEMO_EVAL), a.seq_len, a.eval_samples), a.batch_size)
    rows = []
    for preset in moeq.PRESETS:
        t = time.perf_counter()
        m = copy.deepcopy(base)
        moeq.quantize(m, preset, calib, progress=False)
        r = compare(base, m, evalb)
        rows.append((preset, r))
        print(f"{preset}: {r.as_dict()} ({time.perf_counter() - t:.0f}s)", flush=True)
    print(f"\n| preset | perplexity | Δ ppl | KL(base‖quant) nats/token | top-1 agreement |\n|---|---|---|---|---|")
    print(f"| unquantized ({a.dtype}) | {rows[0][1].ppl_base:.3f} | — | — | — |")
    for preset, r in rows:
        print(f"| {preset} | {r.ppl_quant:.3f} | {r.ppl_quant - r.ppl_base:+.3f} | {r.kl:.4f} | {100 * r.top1_agreement:.1f}% |")
    print(f"\n{rows[0][1].tokens} evaluated tokens; command: python scripts/quality_table.py "
          f"--samples {a.samples} --eval-samples {a.eval_samples} --seq-len {a.seq_len}")


if __name__ == "__main__":
    main()
