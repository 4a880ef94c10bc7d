"""Issue 4: the interception is undone when a forward raises.

An exception raised inside a quantized module's forward (while moeq's torch-function mode
is active) must leave no mode on the thread's stack, and the model must keep working.
A calibration that fails mid-way must leave no hooks and no `moeq_session`.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from transformers.integrations import moe as hf_moe

import moeq

from .helpers import IMPLS, assert_clean, assert_snapshots_equal, fresh, logits, mode_stack_len, snapshot, tm


class Boom(Exception):
    pass


class _Raiser(nn.Module):
    """Stands in for act_fn / _apply_gate; records the mode stack depth when it fires."""

    def __init__(self, exc=Boom):
        super().__init__()
        self.exc, self.depth = exc, None

    def forward(self, *args, **kwargs):
        self.depth = mode_stack_len()
        raise self.exc("raised inside the experts forward")


@contextlib.contextmanager
def raising_between_projections(mod: nn.Module, exc=Boom):
    """Make the experts forward raise after its first projection: through the model's own
    `_apply_gate` (gpt-oss) or `act_fn` (everything else), on this instance only."""
    r = _Raiser(exc)
    custom_gate = type(mod)._apply_gate is not hf_moe._default_apply_gate
    if custom_gate:
        mod.__dict__["_apply_gate"] = r  # instance attribute shadows the class method
    else:
        old = mod.act_fn
        mod.act_fn = r
    try:
        yield r
    finally:
        if custom_gate:
            del mod.__dict__["_apply_gate"]
        else:
            mod.act_fn = old


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "gpt_oss", "nemotron_h"])
def test_raise_inside_experts_forward_after_quantize(pristine, model_type, impl):
    base = pristine(model_type)
    m = fresh(base, impl)
    ids = tm.random_input_ids(m, 2, 16, seed=99)
    moeq.quantize(m, "nvfp4", [tm.random_input_ids(m, 2, 16, seed=1)], progress=False)
    before = logits(m, ids)
    _, mod = tm.experts_modules(m)[0]
    with raising_between_projections(mod) as r, pytest.raises(Boom):
        logits(m, ids)
    assert r.depth is not None and r.depth >= 1, "the error was not raised under moeq's interception"
    assert mode_stack_len() == 0, torch.overrides._get_current_function_mode_stack()
    assert torch.equal(logits(m, ids), before), "the fake-quant forward changed after a failed forward"
    assert mode_stack_len() == 0


def test_raise_in_a_user_pre_hook_and_in_a_linear(pristine):
    """Errors raised after moeq's pre-hook pushed its mode but outside the module's own code."""
    m = fresh(pristine("qwen3_moe"))
    ids = tm.random_input_ids(m, 2, 16, seed=99)
    moeq.quantize(m, "fp8", [tm.random_input_ids(m, 2, 16, seed=1)], progress=False)
    before = logits(m, ids)
    name, mod = tm.experts_modules(m)[0]

    def pre(_m, _a):
        assert mode_stack_len() == 1  # moeq's mode is active here
        raise Boom("user pre-hook")

    h = mod.register_forward_pre_hook(pre)
    with pytest.raises(Boom):
        logits(m, ids)
    h.remove()
    assert mode_stack_len() == 0

    lin = m.get_submodule("model.layers.0.self_attn.o_proj")
    orig = lin.forward

    def failing_forward(x):
        orig(x)  # runs the intercepted F.linear first
        raise Boom("inside a Linear")

    lin.forward = failing_forward
    with pytest.raises(Boom):
        logits(m, ids)
    del lin.forward
    assert mode_stack_len() == 0
    assert torch.equal(logits(m, ids), before)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_failing_calibration_forward_leaves_model_clean(pristine, impl):
    base = pristine("qwen3_5_moe")
    m = fresh(base, impl)
    calib = [tm.random_input_ids(m, 2, 16, seed=s) for s in (1, 2)]
    _, mod = tm.experts_modules(m)[0]
    with raising_between_projections(mod), pytest.raises(Boom):
        moeq.quantize(m, "nvfp4", calib, progress=False)
    assert_clean(m)
    # The same model quantizes afterwards exactly like a fresh copy: no stale statistics.
    moeq.quantize(m, "nvfp4", calib, progress=False)
    ref = fresh(base, impl)
    moeq.quantize(ref, "nvfp4", calib, progress=False)
    assert_snapshots_equal(snapshot(m), snapshot(ref))


def _count_forwards(model):
    n = []
    h = model.register_forward_hook(lambda *_: n.append(1))
    return n, h


@pytest.mark.parametrize("bad", ["out_of_vocab", "loader_error"])
def test_bad_data_midway_leaves_no_hooks(pristine, bad):
    m = fresh(pristine("qwen3_moe"))
    good = tm.random_input_ids(m, 2, 16, seed=1)

    def data():
        yield good
        if bad == "loader_error":
            raise OSError("shard 2 is corrupt")
        yield torch.full((2, 16), m.config.vocab_size + 5)

    n, h = _count_forwards(m)
    with pytest.raises(ValueError if bad == "out_of_vocab" else OSError):
        moeq.quantize(m, "nvfp4", data(), progress=False)
    h.remove()
    assert len(n) == 1, "the first batch should have been calibrated before the failure"
    assert_clean(m)
    for mod in m.modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks
    # Nothing was fake-quantized: the model computes what the pristine model computes.
    ids = tm.random_input_ids(m, 2, 16, seed=99)
    assert torch.equal(logits(m, ids), logits(pristine("qwen3_moe"), ids))


def _pop_leaked_modes(n0: int) -> int:
    n = mode_stack_len()
    while mode_stack_len() > n0:
        torch._C._pop_torch_function_stack()
    return n


@pytest.mark.parametrize("phase", ["calibration", "after_quantize"])
def test_keyboard_interrupt_pops_the_mode(pristine, phase):
    m = fresh(pristine("qwen3_moe"))
    calib = [tm.random_input_ids(m, 2, 16, seed=1)]
    _, mod = tm.experts_modules(m)[0]
    n0 = mode_stack_len()
    try:
        if phase == "after_quantize":
            moeq.quantize(m, "nvfp4", calib, progress=False)
        with raising_between_projections(mod, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
            if phase == "calibration":
                moeq.quantize(m, "nvfp4", calib, progress=False)
            else:
                logits(m, calib[0])
        if phase == "after_quantize":
            # torch skips forward hooks on KeyboardInterrupt, so the mode outlives the call until the
            # module's next call pops it: a normal forward afterwards must work and leave the stack clean
            assert torch.isfinite(logits(m, calib[0])).all()
    finally:
        leaked = _pop_leaked_modes(n0)  # never let a leaked mode reach other tests
    assert leaked == n0, f"{leaked - n0} torch function mode(s) left on the stack after Ctrl-C"


@pytest.mark.parametrize("impl", IMPLS)
def test_keyboard_interrupt_leaves_model_usable_at_once(pristine, impl, tmp_path):
    """Issue 11: after a Ctrl-C inside a quantized forward, with NO further forward: no mode is
    left on the stack, state_dict() returns the original weights (not fake-quant copies) and
    the model exports."""
    m = fresh(pristine("qwen3_moe"), impl)
    calib = [tm.random_input_ids(m, 2, 16, seed=1)]
    moeq.quantize(m, "nvfp4", calib, progress=False)
    _, mod = tm.experts_modules(m)[0]
    n0 = mode_stack_len()
    with raising_between_projections(mod, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        logits(m, calib[0])
    leaked = _pop_leaked_modes(n0)
    assert leaked == n0, f"{leaked - n0} torch function mode(s) left on the stack right after Ctrl-C"
    sd = m.state_dict()
    assert torch.equal(sd[f"{tm.experts_modules(m)[0][0]}.gate_up_proj"], pristine("qwen3_moe").state_dict()[
        f"{tm.experts_modules(m)[0][0]}.gate_up_proj"])
    moeq.export(m, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_non_finite_activations_stop_calibration(pristine):
    """Issue 11: NaN/inf in a module's input stops calibration naming the module and batch
    (it used to turn input scales into 1.0 silently)."""
    m = fresh(pristine("qwen3_moe"))
    name, mod = tm.experts_modules(m)[1]
    good, bad = tm.random_input_ids(m, 2, 16, seed=1), tm.random_input_ids(m, 2, 16, seed=2)
    poisoned = {"on": False}

    def poison(module, args, kwargs):
        if poisoned["on"]:
            h = args[0].clone()
            h[0, 0] = float("nan")
            return (h, *args[1:]), kwargs
        return None

    class Data:
        def __iter__(self):
            yield good
            poisoned["on"] = True
            yield bad

    h = mod.register_forward_pre_hook(poison, with_kwargs=True, prepend=True)
    try:
        with pytest.raises(ValueError, match=rf"batch 1: the input of {name} holds NaN"):
            moeq.quantize(m, "nvfp4", Data(), progress=False)
    finally:
        h.remove()
    assert_clean(m)
