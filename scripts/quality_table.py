"""Measured quality of every preset on the demo model: perplexity, KL and top-1 agreement
against the unquantized model on the held-out split, with each algorithm's calibration time
and moeq.quantize's peak memory above its start (RSS sampled every 1 ms on CPU, the
allocator's peak on CUDA). Prints the README's quality table.

    python scripts/quality_table.py [--samples 64] [--eval-samples 64] [--seq-len 256]
    python scripts/quality_table.py --presets nvfp4,w4a16-int4 --algorithm max,mse,gptq,mse+gptq
    python scripts/quality_table.py --presets nvfp4 --inputs-only   # + the activation quantization alone
    python scripts/quality_table.py --model /work/model2/model ...   # second model (train_demo.py --arch qwen3_moe)

Same data path as `moeq quantize --eval`: calibration on moeq/demo/calib.txt, evaluation
on moeq/demo/eval.txt (disjoint files), both cut into non-overlapping windows.  Another
--model must use the demo's tokenizer (checked: both tokenize these texts identically).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import transformers

import moeq
from moeq import data as D
from moeq.evaluate import compare

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from peak_memory import PeakMemory  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(D.DEMO_MODEL),
                    help="checkpoint directory (default: the demo model); must share the demo's tokenizer")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--presets", default=",".join(moeq.PRESETS), help="comma-separated presets (default: all)")
    ap.add_argument("--algorithm", default="max",
                    help="comma-separated calibration algorithms to compare (max, awq, mse, gptq, mse+gptq, awq+gptq, ...)")
    ap.add_argument("--inputs-only", action="store_true",
                    help="also measure each W4A4/W8A8 preset with its activation quantization alone (weights left "
                         "unquantized): the error no weight algorithm can remove")
    a = ap.parse_args(argv)
    algorithms = a.algorithm.split(",")
    other_model = Path(a.model).resolve() != D.DEMO_MODEL.resolve()
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    base = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).eval()
    calib_w = D.token_windows(tok, D.read_text(D.DEMO_CALIB), a.seq_len, a.samples)
    eval_w = D.token_windows(tok, D.read_text(D.DEMO_EVAL), a.seq_len, a.eval_samples)
    if other_model:  # the held-out texts are the demo's: the tokenizer must be too
        demo_tok = transformers.AutoTokenizer.from_pretrained(D.DEMO_MODEL)
        same = (torch.equal(calib_w, D.token_windows(demo_tok, D.read_text(D.DEMO_CALIB), a.seq_len, a.samples))
                and torch.equal(eval_w, D.token_windows(demo_tok, D.read_text(D.DEMO_EVAL), a.seq_len, a.eval_samples)))
        if not same:
            raise SystemExit(f"{a.model}: its tokenizer differs from the demo's ({D.DEMO_MODEL}); "
                             "the demo's calib/eval texts would not mean the same tokens")
        print(f"{a.model}: {base.config.model_type}, tokenizer identical to the demo's on calib/eval", flush=True)
    calib, evalb = D.batches(calib_w, a.batch_size), D.batches(eval_w, a.batch_size)
    rows = []
    for preset in a.presets.split(","):
        for alg in algorithms:
            t = time.perf_counter()
            m = copy.deepcopy(base)
            with PeakMemory(next(base.parameters()).device.type) as pm:
                rep = moeq.quantize(m, preset, calib, progress=False, algorithm=alg)
            r = compare(base, m, evalb)
            calib_s = rep.calib_seconds + rep.algorithm_seconds
            rows.append((preset, alg, r, calib_s, pm.peak / 2**20))
            print(f"{preset} {alg}: {r.as_dict()} calibration {calib_s:.1f}s, peak +{pm.peak / 2**20:.0f} MiB "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
        if a.inputs_only and moeq.get_recipe(preset).input is not None:
            m = copy.deepcopy(base)
            rep = moeq.quantize(m, preset, calib, progress=False)
            for st in [*m.moeq_session.experts, *m.moeq_session.linears.values()]:
                st.weights_are_fake_quant = True  # the forward then uses the parameters as they are: unquantized
            r = compare(base, m, evalb)
            rows.append((preset, "inputs only", r, rep.calib_seconds, float("nan")))
            print(f"{preset} inputs only: {r.as_dict()}", flush=True)
    show_alg = algorithms != ["max"] or a.inputs_only
    head = "| preset |" + (" algorithm |" if show_alg else "")
    print(f"\n{head} perplexity | Δ ppl | KL(base‖quant) nats/token | top-1 agreement |"
          + (" calibration s | quantize peak MiB |" if show_alg else "") + "\n|---|" + ("---|" if show_alg else "")
          + "---|---|---|---|" + ("---|---|" if show_alg else ""))
    print(f"| unquantized ({a.dtype}) |" + (" |" if show_alg else "") + f" {rows[0][2].ppl_base:.3f} | — | — | — |"
          + (" | |" if show_alg else ""))
    for preset, alg, r, calib_s, peak in rows:
        print(f"| {preset} |" + (f" {alg} |" if show_alg else "")
              + f" {r.ppl_quant:.3f} | {r.ppl_quant - r.ppl_base:+.3f} | {r.kl:.4f} | {100 * r.top1_agreement:.1f}% |"
              + (f" {calib_s:.1f} | {peak:.0f} |" if show_alg else ""))
    print(f"\n{rows[0][2].tokens} evaluated tokens; command: python scripts/quality_table.py "
          + (f"--model {a.model} " if other_model else "")
          + f"--samples {a.samples} --eval-samples {a.eval_samples} --seq-len {a.seq_len}"
          + (f" --presets {a.presets} --algorithm {a.algorithm}" if show_alg else "")
          + (" --inputs-only" if a.inputs_only else "") + (f" --dtype {a.dtype}" if a.dtype != "bfloat16" else ""))


if __name__ == "__main__":
    main()
