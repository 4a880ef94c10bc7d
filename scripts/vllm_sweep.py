#!/usr/bin/env python
"""vLLM 0.33 loader verdicts for the supported-models table (slow: ~45 s per checkpoint on 2 cores).

    MOEQ_VLLM_PYTHON=$(../shared/tools/vllm-load-check/setup.sh) python scripts/vllm_sweep.py [--budget-min 60] [TYPE ...]
    python scripts/support_table.py   # then re-render the README table with the new column

For every model type of the supported-models sweep whose tiny model's architecture vLLM 0.33 registers, the bf16
tiny model is quantized with each preset of PRESETS, exported in both layouts and run through the shared check
(tests/engines/vllm_check.py). Verdicts go to tests/support/vllm_verdicts.json (written after each checkpoint, so
an interrupted run keeps what it did; types already there are skipped unless --redo). Core models first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from engines import vllm_check as vc  # noqa: E402
from support import sweep  # noqa: E402

import tiny_models as tm  # noqa: E402

VERDICTS = REPO / "tests" / "support" / "vllm_verdicts.json"
PRESETS = ("nvfp4",)
#: also checked when moeq refuses every PRESETS combination (experts with biases: gpt-oss)
FALLBACK = ("w4a16-int4", "compressed-tensors")
CORE_TYPES = ("gpt_oss", "mixtral", "deepseek_v3", "qwen3_moe", "qwen3_5_moe_text", "nemotron_h")


def vllm_archs() -> tuple[str, list[str]]:
    code = ("import json, vllm; from vllm.model_executor.models.registry import ModelRegistry; "
            "print(json.dumps([vllm.__version__, sorted(ModelRegistry.get_supported_archs())]))")
    out = subprocess.run([vc.vllm_python(), "-c", code], capture_output=True, text=True, check=True, timeout=600)
    version, archs = json.loads(out.stdout.strip().splitlines()[-1])
    return version, archs


def load() -> dict:
    return json.loads(VERDICTS.read_text()) if VERDICTS.exists() else {"vllm": None, "presets": list(PRESETS), "types": {}}


def save(data: dict) -> None:
    data["types"] = dict(sorted(data["types"].items()))
    VERDICTS.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("types", nargs="*", help="model types (default: every discovered type, core ones first)")
    ap.add_argument("--budget-min", type=float, default=60.0, help="stop starting new model types after this many minutes")
    ap.add_argument("--redo", action="store_true", help="re-run types already in the JSON")
    a = ap.parse_args(argv)
    reason = vc.skip_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    data = load()
    version, archs = vllm_archs()
    data["vllm"] = version
    cases = {c.model_type: c for c in sweep.discover_cases()}
    order = list(a.types) or sorted(cases, key=lambda t: (t not in CORE_TYPES, t))
    for mt in order:
        if time.perf_counter() - t0 > a.budget_min * 60:
            print(f"budget of {a.budget_min} min spent; stopping before {mt}", flush=True)
            break
        if mt in data["types"] and not a.redo:
            continue
        case = cases[mt]
        arch = case.model_class_name
        entry: dict = {"architecture": arch}
        if case.model_class is None or arch not in archs:
            entry["status"] = f"no vLLM {version} model class for {arch or 'this type'}"
        else:
            cache: dict = {}
            with tempfile.TemporaryDirectory(prefix="moeq-vllm-sweep-") as tmp:
                for preset, layout in [(p, lay) for p in PRESETS for lay in vc.LAYOUTS] + [FALLBACK]:
                    if (preset, layout) == FALLBACK and not all(
                            entry.get(f"{p} {lay}", "").startswith("refused") for p in PRESETS for lay in vc.LAYOUTS):
                        continue
                    out = Path(tmp) / f"{mt}-{preset}-{layout}"
                    t1 = time.perf_counter()
                    try:
                        refused = vc.export_tiny(mt, preset, layout, out, cache)
                    except Exception as e:  # noqa: BLE001 - recorded, never hidden
                        entry[f"{preset} {layout}"] = sweep._one_line(f"moeq failed: {type(e).__name__}: {e}", out)
                        continue
                    if refused is not None:
                        entry[f"{preset} {layout}"] = f"refused: {refused}"
                    else:
                        verdict, _ = vc.run_check(out)
                        entry[f"{preset} {layout}"] = sweep._one_line(verdict, out)
                    print(f"{mt:28s} {preset} {layout:18s} {time.perf_counter() - t1:5.0f}s "
                          f"{entry[f'{preset} {layout}'][:150]}", flush=True)
        data["types"][mt] = entry
        save(data)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; {len(data['types'])} types in {VERDICTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
