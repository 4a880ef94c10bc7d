"""Run the shared vLLM loader check (`../shared/tools/vllm-load-check/`) on moeq exports.

The check drives vLLM 0.33's own code on CPU (config parsing, model construction with every layer's quant
method, `load_weights` with vLLM's weight loaders) and reports checkpoint tensors vLLM drops and parameter
elements nothing wrote. It needs a vLLM environment (~9 GB, built by the tool's `setup.sh`); point
``MOEQ_VLLM_PYTHON`` at its python. One checkpoint per process (~30-60 s each on 2 cores).

Verdicts: ``pass`` (the tool's VERDICT PASS); ``pass (placeholders)``: the tool's only problems are the
:data:`UNREADABLE_PLACEHOLDERS` (see there); ``fail: ...`` otherwise; ``refused: ...`` when moeq refuses the
combination before calibration (:class:`moeq.checkpoint.layouts.UnsupportedExport`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import moeq
from moeq.checkpoint.layouts import UnsupportedExport

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import tiny_models as tm  # noqa: E402

ENV_PYTHON = "MOEQ_VLLM_PYTHON"  #: python of a venv with vLLM 0.33 (the tool's setup.sh prints it)
ENV_CHECK = "MOEQ_VLLM_CHECK"  #: the check script, if not at ../shared/tools/vllm-load-check/
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CHECK = REPO.parent / "shared" / "tools" / "vllm-load-check" / "vllm_load_check.py"

PRESETS = ("fp8", "nvfp4", "w4a16-nvfp4", "w4a16-int4", "fp8-dynamic")
LAYOUTS = ("modelopt", "compressed-tensors")
#: every preset x layout moeq writes (vLLM's modelopt loader has no INT4 scheme: refused for every model)
COMBOS = [(p, lay) for p in PRESETS for lay in LAYOUTS
          if (p, lay) not in (("w4a16-int4", "modelopt"), ("fp8-dynamic", "modelopt"))]

#: Expert parameters vLLM 0.33 registers but never reads, and that its gpt-oss loader has no path to fill from
#: any checkpoint name: CompressedTensorsWNA16MoEMethod.create_weights registers `w13_weight_shape` /
#: `w2_weight_shape` ([E, 2], "empty"); nothing in vLLM reads them after loading, and gpt_oss.py's
#: `_load_weights_other` sends every `*.w13_weight*` name through its fused-[E, K, N] branch (3-D slicing,
#: IndexError for a shape vector) while `_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD` has no `*_weight_shape`
#: entry. `vllm serve` does not track weight loading for quantized checkpoints, so they stay empty there too.
#: A result whose ONLY problems are these parameters is "pass (placeholders)"; anything else fails.
UNREADABLE_PLACEHOLDERS = (".experts.routed_experts.w13_weight_shape", ".experts.routed_experts.w2_weight_shape")
#: the vLLM model classes that load through gpt_oss.py's `_load_weights_other` (the waiver applies to them only)
GPT_OSS_LOADERS = ("GptOssForCausalLM", "OpenAIPrivacyFilterForTokenClassification")


def vllm_python() -> str | None:
    return os.environ.get(ENV_PYTHON) or None


def check_script() -> Path:
    return Path(os.environ.get(ENV_CHECK) or DEFAULT_CHECK)


def skip_reason() -> str | None:
    """Why the vLLM check cannot run here (None when it can)."""
    py = vllm_python()
    if py is None:
        return (f"{ENV_PYTHON} is not set: build the vLLM 0.33 environment with "
                f"../shared/tools/vllm-load-check/setup.sh (~9 GB, 10-20 min) and export {ENV_PYTHON}=<the python it prints>")
    if not Path(py).is_file():
        return f"{ENV_PYTHON}={py} does not exist"
    if not check_script().is_file():
        return f"the vLLM load check {check_script()} does not exist (set {ENV_CHECK})"
    return None


def _placeholder(name: str) -> bool:
    return name.endswith(UNREADABLE_PLACEHOLDERS)


def classify(res: dict) -> str:
    """Verdict string of one result of the check (its --json output)."""
    if res.get("ok"):
        return "pass"
    if res.get("error") or res.get("stage") != "done":
        return f"fail: [{res.get('stage')}] {res.get('error', '')}".strip()
    problems = list(res.get("problems", []))
    if res.get("model_class") not in GPT_OSS_LOADERS:
        return "fail: " + " | ".join(x[:300] for x in problems)
    unwritten = dict(res.get("unwritten") or {})
    rest = []
    for p in problems:
        if p.startswith("vLLM track_weights_loading"):
            listed = p.split("[", 1)[1].rsplit("]", 1)[0].replace("'", "").split(", ") if "[" in p else []
            if listed and all(_placeholder(n.strip()) for n in listed) and "more)" not in p:
                continue
        elif "parameters not (fully) written" in p and unwritten and all(_placeholder(n) for n in unwritten):
            continue
        rest.append(p)
    if not rest:
        return "pass (placeholders)"
    return "fail: " + " | ".join(x[:300] for x in rest)


def run_check(ckpt: Path, timeout: int = 900) -> tuple[str, dict]:
    """Run the check on one checkpoint directory in its own process -> (verdict, the tool's JSON result)."""
    with tempfile.TemporaryDirectory(prefix="moeq-vllm-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([vllm_python(), str(check_script()), str(ckpt), "--json", str(out)],
                              capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            return f"fail: the check exited {proc.returncode} without a result: {' / '.join(tail)}", {}
        res = json.loads(out.read_text())
    verdict = classify(res)
    if verdict == "pass" and proc.returncode != 0:
        verdict = f"fail: the check says ok but exited {proc.returncode}"
    return verdict, res


#: vLLM's MLA prefill backends accept only DeepSeek's real head dims (selector.py: "No valid MLA prefill backend"):
#: tiny MLA models keep hidden 128 / 8 experts but get these.
MLA_DIMS = {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512}


def tiny_for_vllm(model_type: str, **overrides):
    """The bf16 tiny model of `model_type`, with DeepSeek's MLA head dims where the config has MLA (and
    `overrides` of its config)."""
    cfg = tm.tiny_config(model_type)
    over = {k: v for k, v in MLA_DIMS.items() if hasattr(cfg, "kv_lora_rank") and hasattr(cfg, k)}
    if "qk_nope_head_dim" in over and hasattr(cfg, "head_dim"):
        over["head_dim"] = MLA_DIMS["qk_rope_head_dim"]
    model = tm.tiny_model(model_type, dtype=torch.bfloat16, **{**over, **overrides})
    # DeepSeek's own configs say topk_method "noaux_tc" (transformers' config class has no such field); vLLM's
    # deepseek_v2.py creates gate.e_score_correction_bias only then
    if getattr(model.config, "topk_method", None) is None and model_type.startswith("deepseek") and any(
            n.endswith("e_score_correction_bias") for n, _ in [*model.named_parameters(), *model.named_buffers()]):
        model.config.topk_method = "noaux_tc"
    return model


def export_tiny(model_type: str, preset: str, layout: str, out: Path, cache: dict | None = None) -> str | None:
    """Quantize the bf16 tiny `model_type` with `preset` (cached per preset in `cache`) and export it in `layout`
    to `out`. -> None, or the one-line refusal when moeq refuses the combination before calibration."""
    key = (model_type, preset)
    if cache is None or key not in cache:
        model = tiny_for_vllm(model_type)
        ids = [tm.random_input_ids(model, batch=2, seq=16, seed=s) for s in range(2)]
        try:
            moeq.quantize(model, preset, ids, progress=False, layout=layout)
        except UnsupportedExport as e:
            return str(e)
        if cache is not None:
            cache[key] = model
    else:
        model = cache[key]
    try:
        moeq.export(model, out, layout, overwrite=True, progress=False)
    except UnsupportedExport as e:
        return str(e)
    return None
