"""Shared helpers for the moeq.quantize tests: hand-written fake-quant references, model
snapshots and checks that the interception left nothing behind.

The references here use only `moeq.formats` (pure functions validated on their own in
tests/formats) and amax values the tests compute themselves; nothing is read back from
moeq's state to build an expected value.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_models as tm  # noqa: E402

from moeq.formats import fp8, int4, nvfp4  # noqa: E402

IMPLS = ("eager", "batched_mm", "grouped_mm")
CORE_MODELS = tuple(tm.CORE_MODELS)
RECIPES = ("fp8", "nvfp4", "w4a16-nvfp4", "w4a16-int4")


def set_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch the experts implementation and check every experts module really uses it."""
    model.set_experts_implementation(impl)
    mods = tm.experts_modules(model)
    assert mods, "no experts module found"
    for name, m in mods:
        assert m.config._experts_implementation == impl, f"{name} still runs {m.config._experts_implementation}"
    return model


def fresh(pristine: nn.Module, impl: str = "grouped_mm") -> nn.Module:
    return set_impl(copy.deepcopy(pristine), impl)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.detach().clone()


def experts_names(model: nn.Module) -> list[str]:
    return [n for n, _ in tm.experts_modules(model)]


# ---------------------------------------------------------------------------------------------
# Hand-written fake quant (the "independent reference")
# ---------------------------------------------------------------------------------------------

def fq_weight_ref(recipe, w_nk: torch.Tensor) -> torch.Tensor:
    """One expert's (or one Linear's) weight [N, K], amax taken from the weight itself."""
    if recipe.weight == "nvfp4":
        return nvfp4.fake_quant(w_nk, w_nk.abs().amax())
    if recipe.weight == "fp8":
        return fp8.fake_quant(w_nk, w_nk.abs().amax())
    return int4.fake_quant(w_nk, recipe.group_size)


def fq_input_ref(recipe, x: torch.Tensor, amax) -> torch.Tensor:
    """x [..., K] with a static per-tensor amax from calibration."""
    if recipe.input is None:
        return x
    if recipe.input == "nvfp4":
        return nvfp4.fake_quant(x, amax)
    return fp8.fake_quant(x, amax)


# ---------------------------------------------------------------------------------------------
# State snapshots
# ---------------------------------------------------------------------------------------------

def _c(t):
    if t is None:
        return None
    if isinstance(t, dict):
        return {k: _c(v) for k, v in t.items()}
    return t.detach().clone()


def snapshot(model: nn.Module) -> dict:
    """Everything moeq computed for a model, cloned: experts by module name, linears by name."""
    s = model.moeq_session
    exp = {}
    for st in s.experts:
        exp[st.target.name] = dict(
            w_amax=_c(st.w_amax), gate_amax=_c(st.gate_amax), up_amax=_c(st.up_amax),
            fq_weight=_c(st.fq_weight), in_amax=_c(st.in_amax), tokens=_c(st.tokens),
            in_param=_c(st.in_param),
        )
    lin = {}
    for name, st in s.linears.items():
        lin[name] = dict(w_amax=_c(st.w_amax), in_amax=_c(st.in_amax), fq_weight=_c(st.fq_weight),
                         in_param=_c(st.in_param))
    return {"experts": exp, "linears": lin}


def assert_tensors_equal(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one is None"
        return
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_tensors_equal(a[k], b[k], f"{what}[{k}]")
        return
    assert torch.equal(a, b), f"{what} differs: max |diff| {(a.double() - b.double()).abs().max().item():.3e}"


def assert_snapshots_equal(a: dict, b: dict) -> None:
    assert a["experts"].keys() == b["experts"].keys()
    assert a["linears"].keys() == b["linears"].keys()
    for name in a["experts"]:
        assert_tensors_equal(a["experts"][name], b["experts"][name], name)
    for name in a["linears"]:
        assert_tensors_equal(a["linears"][name], b["linears"][name], name)


def assert_rows_match(out: torch.Tensor, ref: torch.Tensor, *, rtol: float = 1e-5, min_frac: float = 0.9,
                      worst: float = 2e-2) -> None:
    """Row-wise comparison robust to a rare quantization-rounding flip.

    A value within one float32 ulp of a rounding threshold may be quantized to the neighbour
    code when two computations accumulate a matmul in a different order; that moves one token
    row by up to one quantization step. So: at least `min_frac` of the rows agree to
    `rtol * max|ref|`, and no row is off by more than `worst * max|ref|` (a wrong scale, amax or
    a skipped fake-quant moves nearly every row by a quantization step or more).
    """
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = ref.abs().max().clamp_min(1e-30)
    row_err = (out.double() - ref.double()).abs().flatten(1).amax(1) / scale
    frac = (row_err <= rtol).double().mean().item()
    assert frac >= min_frac, f"only {frac:.2%} of rows match within {rtol:g} (worst {row_err.max().item():.3e})"
    assert row_err.max().item() <= worst, f"worst row off by {row_err.max().item():.3e} of max|ref|"


# ---------------------------------------------------------------------------------------------
# Leftovers of the interception
# ---------------------------------------------------------------------------------------------

def mode_stack_len() -> int:
    return torch._C._len_torch_function_stack()


def hooked_modules(model: nn.Module) -> list[str]:
    """Modules with hooks or with an instance-level forward (moeq's interrupt guard)."""
    return [n for n, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks or getattr(m.__dict__.get("forward"), "moeq_guard", False)]


def assert_clean(model: nn.Module) -> None:
    """No torch-function mode left on this thread, no hook on any module, no moeq session."""
    assert mode_stack_len() == 0, f"torch function modes left: {torch.overrides._get_current_function_mode_stack()}"
    assert hooked_modules(model) == []
    assert getattr(model, "moeq_session", None) is None


def gate_ref(module: nn.Module, model_type: str, h: torch.Tensor) -> torch.Tensor:
    """The experts' activation between the two projections, written out by hand per model."""
    cfg = module.config
    if model_type == "gpt_oss":  # interleaved gate/up, clamped SwiGLU with alpha, (up + 1)
        g, u = h[..., ::2], h[..., 1::2]
        g = g.clamp(max=module.limit)
        u = u.clamp(min=-module.limit, max=module.limit)
        return (u + 1) * (g * torch.sigmoid(g * module.alpha))
    if model_type == "nemotron_h":  # has_gate=False: act(up)
        assert cfg.mlp_hidden_act == "relu2", cfg.mlp_hidden_act
        return F.relu(h).square()
    assert cfg.hidden_act == "silu", cfg.hidden_act
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u

