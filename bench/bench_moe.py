"""Calibration and fake-quant speed/memory of moeq vs the unquantized forward.

    python bench/bench_moe.py                 # full run (16, 64, 256 experts), writes bench/RESULTS.md
    python bench/bench_moe.py --smoke         # tiny config, correctness of the script only (CI)
    python bench/bench_moe.py --dtype bfloat16 --device cuda   # on a GPU
    python bench/bench_moe.py --compile both  # moeq's kernels eager and compiled, side by side

For each config (Qwen3-MoE architecture, 2 layers, top-8) it measures, in ONE process:
unquantized forward under grouped_mm and eager (baseline = the faster), moeq calibration
forward (statistics collection) under grouped_mm and eager, moeq fake-quant forward for
nvfp4 and fp8 (fake-quant weights per call and cached), peak memory of each phase, and the
export time and peak extra memory; for each kernel mode asked (--compile).
Times are medians of several repeats after warm-up; ratios are moeq / baseline.
Memory on CPU is the peak RSS above the phase's starting RSS (a 1 ms sampler thread);
on CUDA, torch.cuda.max_memory_allocated above the starting allocation.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # peak_memory, also when loaded by path (tests)
import moeq  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402
from moeq.quantization import Session  # noqa: E402
from moeq.targets import find_targets  # noqa: E402


def build(num_experts: int, hidden: int, moe_inter: int, dtype, device):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=moe_inter,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
        num_experts=num_experts, num_experts_per_tok=min(8, num_experts), max_position_embeddings=4096,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return model


def _call(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timed(fn, repeats: int, device, first: dict | None = None, key: str = "", ref=None, ratios: dict | None = None) -> float:
    """Median of `repeats` calls after a warm-up call; the warm-up's extra time over the median
    (compilation, mostly) goes to first[key] when given. With `ref` (the plain model's forward),
    each call is followed by one of ref and ratios[key] = the median of the pairwise ratios:
    a shared machine's load changes over minutes, not between two adjacent calls."""
    t_first = _call(fn, device)
    ts, rs = [], []
    for _ in range(repeats):
        ts.append(_call(fn, device))
        if ref is not None:
            rs.append(ts[-1] / _call(ref, device))
    med = statistics.median(ts)
    if first is not None:
        first[key] = t_first - med
    if ratios is not None and rs:
        ratios[key] = statistics.median(rs)
    return med


def set_compile(on: bool) -> None:
    """moeq's fused kernels compiled (MOEQ_COMPILE=1) or eager (MOEQ_COMPILE=0)."""
    os.environ["MOEQ_COMPILE"] = "1" if on else "0"


def bench_config(E, hidden, inter, tokens, repeats, dtype, device, export: bool, modes=("on",)):
    model = build(E, hidden, inter, dtype, device)
    ids = torch.randint(0, 1024, (max(1, tokens // 512), min(512, tokens)), device=device)
    ntok = ids.numel()
    fwd = lambda m: (lambda: m(input_ids=ids, use_cache=False))  # noqa: E731
    row = {"experts": E, "tokens": ntok, "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    with torch.no_grad():
        for impl in ("grouped_mm", "eager"):
            model.set_experts_implementation(impl)
            with PeakMemory(device) as pm:
                row[f"t_{impl}"] = timed(fwd(model), repeats, device)
            row[f"mem_{impl}"] = pm.peak
        best = min(("grouped_mm", "eager"), key=lambda i: row[f"t_{i}"])
        row["baseline"], row["t_base"], row["mem_base"] = best, row[f"t_{best}"], row["mem_grouped_mm"]
        row["modes"] = {}
        plain = copy.deepcopy(model)  # the interleaved reference of every moeq phase
        plain.set_experts_implementation(best)
        fwd(plain)()
        for mode in modes:
            set_compile(mode == "on")
            row["modes"][mode] = bench_moeq(model, ids, fwd, repeats, device, export and mode == modes[-1],
                                            ref=fwd(plain))
        set_compile(True)
        del plain
    row.update(row["modes"][modes[-1]])
    return row


def bench_moeq(model, ids, fwd, repeats, device, export: bool, ref=None) -> dict:
    """Calibration (under grouped_mm and under eager) and fake-quant forwards of one kernel mode;
    row["ratio"][phase]: time over the plain model's forward interleaved with it (`ref`)."""
    row, first, ratio = {}, {}, {}
    model.set_experts_implementation("grouped_mm")
    for recipe in ("nvfp4", "fp8"):
        m = model if recipe == "fp8" else copy.deepcopy(model)
        rec = moeq.get_recipe(recipe)
        s = Session(m, rec, find_targets(m, rec))
        s.attach(calib_all_experts=False)
        if recipe == "nvfp4":
            for impl in ("grouped_mm", "eager"):
                m.set_experts_implementation(impl)
                with PeakMemory(device) as pm:
                    row[f"t_calib_{impl}"] = timed(fwd(m), repeats, device, first, f"calib_{impl}", ref, ratio)
                row[f"mem_calib_{impl}"] = pm.peak
            m.set_experts_implementation("grouped_mm")
            row["t_calib"], row["mem_calib"] = row["t_calib_grouped_mm"], row["mem_calib_grouped_mm"]
        else:
            m(input_ids=ids, use_cache=False)
        s.finalize()  # default: fake-quant weights computed per call, no second copy
        with PeakMemory(device) as pm:
            row[f"t_fq_{recipe}"] = timed(fwd(m), repeats, device, first, f"fq_{recipe}", ref, ratio)
        row[f"mem_fq_{recipe}"] = pm.peak
        # cache_weights=True: one extra copy of the weights, kept between calls
        s.finalize(cache_fake_quant=True)
        with PeakMemory(device) as pm:
            row[f"t_fq_{recipe}_cached"] = timed(fwd(m), repeats, device, first, f"fq_{recipe}_cached", ref, ratio)
        row[f"mem_fq_{recipe}_cached"] = pm.peak
        s.finalize()
        if recipe == "nvfp4" and export:
            m.moeq_session = s
            with tempfile.TemporaryDirectory() as d, PeakMemory(device if device == "cuda" else "cpu") as pm:
                t = time.perf_counter()
                moeq.export(m, Path(d) / "out", "modelopt", progress=False)
                row["t_export"] = time.perf_counter() - t
            row["mem_export"] = pm.peak
            layer_bytes = sum(p.numel() * p.element_size() for p in m.model.layers[0].parameters())
            row["layer_bytes"] = layer_bytes
        s.detach()
        if m is not model:
            del m
        gc.collect()
    row["t_fq_cached"], row["mem_fq_cached"] = row["t_fq_nvfp4_cached"], row["mem_fq_nvfp4_cached"]
    row["first_extra"], row["ratio"] = first, ratio
    return row


def total(r, m, key: str) -> float:
    """Whole memory of the fake-quant forward (resident weights + its peak) over the plain forward's."""
    return (r["model_bytes"] + m[key]) / (r["model_bytes"] + r["mem_base"])


def table(rows, header: str) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    out = [header, "",
           "| experts | tokens | kernels | grouped_mm tok/s | eager tok/s | baseline | calib / base: best (under grouped_mm, under eager) | fq nvfp4 / base | fq nvfp4 cached / base | fq fp8 / base | fq fp8 cached / base | first call extra s: calib, fq nvfp4, fq fp8 | mem base MiB | mem calib MiB (ratio) | fq memory: weights + peak, vs base (cached) | export s | export peak extra MiB (one layer MiB) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tb = r["t_base"]
        for mode, m in r.get("modes", {"on": r}).items():
            q = m.get("ratio") or {}
            rt = lambda k: q.get(k, m[f"t_{k}"] / tb)  # noqa: E731 - interleaved ratio, else over the first baseline
            fe = m["first_extra"]
            out.append(
                f"| {r['experts']} | {r['tokens']} | {'compiled' if mode == 'on' else 'eager (MOEQ_COMPILE=0)'} "
                f"| {r['tokens'] / r['t_grouped_mm']:.0f} | {r['tokens'] / r['t_eager']:.0f} | {r['baseline']} "
                f"| {min(rt('calib_grouped_mm'), rt('calib_eager')):.2f}x ({rt('calib_grouped_mm'):.2f}x, {rt('calib_eager'):.2f}x) "
                f"| {rt('fq_nvfp4'):.2f}x | {rt('fq_nvfp4_cached'):.2f}x "
                f"| {rt('fq_fp8'):.2f}x | {rt('fq_fp8_cached'):.2f}x "
                f"| {fe['calib_grouped_mm']:.1f}, {fe['fq_nvfp4']:.1f}, {fe['fq_fp8']:.1f} "
                f"| {mib(r['mem_base'])} | {mib(m['mem_calib'])} ({m['mem_calib'] / max(r['mem_base'], 1):.2f}x) "
                f"| {total(r, m, 'mem_fq_nvfp4'):.2f}x ({total(r, m, 'mem_fq_cached'):.2f}x) "
                f"| {m.get('t_export', float('nan')):.2f} | {mib(m.get('mem_export', 0))} ({mib(m.get('layer_bytes', 0))}) |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config, 1 repeat: checks the script, not the speed")
    ap.add_argument("--experts", type=int, nargs="*", default=[16, 64, 256])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--moe-intermediate", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", choices=("on", "off", "both"), default="on",
                    help="moeq's fused kernels compiled (on, the default), eager (off, MOEQ_COMPILE=0) or both, "
                         "side by side in one run")
    ap.add_argument("--out", help="write the markdown table here")
    a = ap.parse_args(argv)
    if a.smoke:
        a.experts, a.hidden, a.moe_intermediate, a.tokens, a.repeats = [8], 128, 128, 64, 1
    dtype = getattr(torch, a.dtype)
    rows = []
    for E in a.experts:
        rows.append(bench_config(E, a.hidden, a.moe_intermediate, a.tokens, a.repeats, dtype, a.device, export=(E == max(a.experts)),
                                modes=("off", "on") if a.compile == "both" else (a.compile,)))
        print(table(rows[-1:], f"E={E}"), flush=True)
    cmd = "python bench/bench_moe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    md = table(rows, f"### {a.dtype} on {dev}\n\n`{cmd.strip()}` (hidden {a.hidden}, moe_intermediate {a.moe_intermediate}, top-8, 2 layers, median of {a.repeats})")
    print("\n" + md)
    if a.out:
        Path(a.out).write_text(md + "\n")
    return rows


if __name__ == "__main__":
    main()
