"""Streaming keeps peak memory to about one layer: quantize a synthetic ~3.3 GB MoE
checkpoint (bf16, 64 experts, 16 layers of ~200 MB) in a fresh process and bound its
peak RSS. The figures are printed (run with -s to see them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_checkpoint  # noqa: E402

# Memory is the process's anonymous RSS (RssAnon), sampled every millisecond: the pages of
# the checkpoint's memory-mapped shards are page cache the kernel can drop at any time and
# would make plain RSS depend on timing.
CHILD = r"""
import json, resource, sys, threading, time, torch
from moeq.streaming import quantize_streaming
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
base, peak, stop = anon(), [anon()], []
def sample():
    while not stop:
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
th = threading.Thread(target=sample, daemon=True)
th.start()
t = time.perf_counter()
ids = [torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(s)) for s in range(2)]
report, exp = quantize_streaming(sys.argv[1], "fp8", ids, sys.argv[2], "modelopt", progress=False)
stop.append(1)
th.join()
print(json.dumps({"peak_rss": max(peak[0], anon()), "base_rss": base, "hwm_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.perf_counter() - t, "export_bytes": exp.bytes_written}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("big") / "src"
    cfg = synthetic_checkpoint.config(layers=16)
    size = synthetic_checkpoint.write(d, cfg)
    return d, size, cfg


def test_streaming_peak_memory_is_about_one_layer(big_checkpoint, tmp_path):
    src, size, cfg = big_checkpoint
    assert size > 3 * 2**30
    layer = size / cfg.num_hidden_layers
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    extra = res["peak_rss"] - res["base_rss"]
    print(f"\ncheckpoint {size / 2**30:.2f} GiB ({layer / 2**20:.0f} MiB per layer); streaming fp8: peak anonymous RSS "
          f"{res['peak_rss'] / 2**30:.2f} GiB ({res['peak_rss'] / size:.0%} of the checkpoint), "
          f"{extra / 2**20:.0f} MiB above the process baseline (RSS high-water mark incl. mapped shard pages "
          f"{res['hwm_rss'] / 2**30:.2f} GiB); {res['seconds']:.0f}s")
    assert res["peak_rss"] < 0.4 * size
    # one layer in bf16, its quantized output pending in the shard writer, bounded fp32 chunk
    # transients and the calibration activations; a non-streaming run needs > 1x the checkpoint
    assert extra < 5 * layer
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert any(k.endswith("experts.63.down_proj.weight_scale") for k in index["weight_map"])
