"""The benchmark script runs end to end on a tiny config (correctness only, no timing)."""

import importlib.util
import math
from pathlib import Path


def test_bench_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_moe.py"
    spec = importlib.util.spec_from_file_location("bench_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "table.md"
    rows = mod.main(["--smoke", "--out", str(out)])
    assert len(rows) == 1
    r = rows[0]
    for k in ("t_grouped_mm", "t_eager", "t_calib", "t_fq_nvfp4", "t_fq_fp8", "t_export"):
        assert math.isfinite(r[k]) and r[k] > 0, k
    assert r["baseline"] in ("grouped_mm", "eager")
    text = out.read_text()
    assert "| 8 | 64 |" in text and "calib / base" in text
