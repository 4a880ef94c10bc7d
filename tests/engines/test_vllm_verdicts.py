"""The verdict rules of vllm_check.classify (no vLLM needed): only the listed placeholders are waived."""

from __future__ import annotations

from .vllm_check import classify

_PH = "model.layers.0.mlp.experts.routed_experts.w13_weight_shape"
_TRACK = "vLLM track_weights_loading: Following weights were not initialized from checkpoint: "


def _res(problems, unwritten=None, **kw):
    return {"ok": not problems, "stage": "done", "problems": problems, "unwritten": unwritten or {},
            "model_class": "GptOssForCausalLM", **kw}


def test_pass():
    assert classify(_res([])) == "pass"


def test_placeholders_only():
    res = _res([_TRACK + f"['{_PH}']", f"1 parameters not (fully) written from checkpoint data: {_PH}: 16/16"],
               {_PH: "16/16 elements never written"})
    assert classify(res) == "pass (placeholders)"


def test_other_unwritten_parameter_fails():
    other = "model.layers.0.mlp.experts.routed_experts.w13_weight_packed"
    res = _res([_TRACK + f"['{_PH}', '{other}']", "2 parameters not (fully) written from checkpoint data: ..."],
               {_PH: "16/16", other: "65536/65536"})
    assert classify(res).startswith("fail")


def test_dropped_tensors_fail():
    res = _res([_TRACK + f"['{_PH}']", "3 checkpoint tensors read but silently dropped by vLLM: [...]"], {_PH: "16/16"})
    assert classify(res).startswith("fail")


def test_crash_fails():
    assert classify({"ok": False, "stage": "load-weights", "error": "KeyError: 'w2_bias'"}).startswith("fail: [load-weights]")


def test_placeholders_waived_only_for_the_gpt_oss_loader():
    res = _res([_TRACK + f"['{_PH}']"], {_PH: "16/16"}, model_class="MixtralForCausalLM")
    assert classify(res).startswith("fail")
