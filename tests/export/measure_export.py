"""Export time and peak memory for a demo-sized Qwen3.5-MoE (not collected by pytest).

    python tests/export/measure_export.py [--hidden 256 --experts 16 --layers 4 --threads 1 --exact-rss]

Builds a tiny-but-bigger text-only Qwen3.5-MoE from its real config class (3 gated-delta-net
layers + 1 full-attention layer, fp32), quantizes it with the nvfp4 preset, and exports it in
both layouts, printing for each export:
- wall time;
- tracemalloc peak: Python-heap allocations only (torch tensor storage bypasses it);
- RSS: extra resident memory at the peak during the export (sampled every 2 ms, and from
  VmHWM after resetting it through /proc/self/clear_refs where the kernel allows) and after it.
  By default glibc may serve the export from memory quantization freed into malloc's arenas,
  so RSS under-reports; --exact-rss re-runs the script with a fixed glibc mmap threshold
  (MALLOC_MMAP_THRESHOLD_=64 KiB): freed tensor storage then goes back to the OS and RSS
  follows what the export allocates, at the price of much slower allocation (do not read the
  times of that run).
Each layout is exported --repeats times (the first run also pays one-time warm-up costs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models
import tiny_models as tm  # noqa: E402

import moeq  # noqa: E402

MiB = 2**20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    def __init__(self, period: float = 0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def __enter__(self):
        self.peak = _status("VmRSS")
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("VmRSS"))
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status("VmRSS"))


def build(hidden: int, experts: int, layers: int):
    # layer_types=None: the config derives them from full_attention_interval (every 4th layer full attention)
    model = tm.tiny_model(
        "qwen3_5_moe", hidden_size=hidden, num_experts=experts, num_experts_per_tok=4, num_hidden_layers=layers,
        layer_types=None, full_attention_interval=4, moe_intermediate_size=hidden,
        shared_expert_intermediate_size=hidden, vocab_size=4096,
    )
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (2 were ~20x slower on a busy 2-core box)")
    ap.add_argument("--preset", default="nvfp4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--exact-rss", action="store_true", help="re-run with a fixed glibc mmap threshold (slow)")
    args = ap.parse_args()
    if args.exact_rss and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    torch.set_num_threads(args.threads)

    model = build(args.hidden, args.experts, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {type(model).__name__}, hidden {args.hidden}, {args.experts} experts, {args.layers} layers "
          f"{model.config.layer_types}, "
          f"{n_params / 1e6:.2f}M params ({param_bytes / MiB:.1f} MiB fp32); torch threads {args.threads}")
    calib = [tm.random_input_ids(model, batch=2, seq=64, seed=s) for s in range(2)]
    t0 = time.perf_counter()
    report = moeq.quantize(model, args.preset, calib, progress=False)
    print(f"quantize {args.preset}: {time.perf_counter() - t0:.2f}s "
          f"({report.calib_tokens} calibration tokens, {len(report.quantized)} modules)")

    with tempfile.TemporaryDirectory() as tmp:
        for layout, run in [(lay, r) for r in range(args.repeats) for lay in ("modelopt", "compressed-tensors")]:
            out = Path(tmp) / f"{layout}-{run}"
            rss0 = _status("VmRSS")
            hwm_ok = _reset_hwm()
            tracemalloc.start()
            with RssSampler() as rss:
                t0 = time.perf_counter()
                exp = moeq.export(model, out, layout, progress=False)
                wall = time.perf_counter() - t0
            _, py_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            hwm = _status("VmHWM") if hwm_ok else None
            rss1 = _status("VmRSS")
            peak = max(rss.peak, hwm or 0)
            print(f"export {layout:18s} run {run}: {wall:6.2f}s wall, {exp.bytes_written / MiB:6.2f} MiB in {exp.tensors} tensors; "
                  f"tracemalloc peak {py_peak / MiB:6.2f} MiB; RSS peak extra {(peak - rss0) / MiB:6.1f} MiB "
                  f"(sampled {(rss.peak - rss0) / MiB:.1f}, VmHWM {'n/a' if hwm is None else f'{(hwm - rss0) / MiB:.1f}'}), "
                  f"RSS after {(rss1 - rss0) / MiB:+.1f} MiB")
            t0 = time.perf_counter()
            moeq.load(out)
            print(f"  load back: {time.perf_counter() - t0:.2f}s")
    print(f"cpu count {os.cpu_count()}; MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')}")


if __name__ == "__main__":
    main()
