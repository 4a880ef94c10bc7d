"""The compiled (fused) kernels give the eager kernels' bits, compile once per dtype and fall
back to eager cleanly (moeq/fused.py).

The test suite runs with MOEQ_COMPILE=0 (tests/conftest.py: compiling costs ~5 s per graph
on a CI machine); the tests here turn it on and lower the size threshold so that small
inputs compile. Everything compiled here is float32 except one nvfp4 parametrization per
other dtype: each dtype is one more graph.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.overrides import TorchFunctionMode

from moeq import fused
from moeq.formats import fp8, nvfp4

KERNELS = {"nvfp4": nvfp4._FQ, "fp8": fp8._FQ, "fp8-row": fp8._FQ_DYNAMIC, "absmax": fused._ROW_ABSMAX}


@pytest.fixture
def compiled(monkeypatch):
    """Compile on, every size and device compiled, compile failures reset (restored after the test)."""
    monkeypatch.setenv("MOEQ_COMPILE", "1")
    for k in KERNELS.values():
        monkeypatch.setattr(k, "min_numel", 0)
        monkeypatch.setattr(k, "devices", ("cpu", "cuda"))
        monkeypatch.setattr(k, "failed", False)
    return KERNELS


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def same(eager: torch.Tensor, comp: torch.Tensor) -> bool:
    """Bit-identical, except that a NaN's sign/payload may differ (its position may not)."""
    nan = torch.isnan(eager)
    return (eager.shape == comp.shape and eager.dtype == comp.dtype and torch.equal(nan, torch.isnan(comp))
            and torch.equal(bits(eager)[~nan], bits(comp)[~nan]))


def sample(dtype, rows: int = 37, k: int = 256) -> torch.Tensor:
    """Odd row count; zero blocks, denormals, -0.0, tiny negatives, saturating values, inf, NaN."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    x[0, :32] = 0.0
    x[1, :16] = -0.0
    x[2, :16] = torch.finfo(dtype).tiny / 4  # denormal in x's dtype
    x[2, 16:32] = -torch.finfo(dtype).tiny / 8
    x[3, :4] = torch.tensor([-1e-3, 1e-3, -0.0, 1e-3])
    x[4, 5] = float("inf")
    x[5, 7] = -float("inf")
    x[6, 9] = float("nan")
    return x.to(dtype)


def run_both(fn, monkeypatch):
    monkeypatch.setenv("MOEQ_COMPILE", "0")
    eager = fn()
    monkeypatch.setenv("MOEQ_COMPILE", "1")
    return eager, fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4_bit_exact(compiled, monkeypatch, dtype):
    x = sample(dtype)
    n = compiled["nvfp4"].compiled_calls
    for gs in (nvfp4.global_scale(torch.tensor(40.0)), nvfp4.global_scale(x.float().abs().amax(-1, keepdim=True).nan_to_num(1.0, 1.0))):
        eager, comp = run_both(lambda: nvfp4.fake_quant_with_global_scale(x, gs), monkeypatch)
        assert same(eager, comp)
    assert compiled["nvfp4"].compiled_calls == n + 2
    w = sample(dtype, 64)[8:].reshape(4, 14, 256)  # weights: [E, N, K], per-expert amax
    amax = w.float().abs().amax(dim=(1, 2))
    eager, comp = run_both(lambda: nvfp4.fake_quant(w, amax), monkeypatch)
    assert same(eager, comp)


@pytest.mark.parametrize("kernel", ["fp8", "fp8-row", "absmax"])
def test_fp8_and_absmax_bit_exact(compiled, monkeypatch, kernel):
    x = sample(torch.float32)
    fn = {"fp8": lambda: fp8.fake_quant_with_scale(x, fp8.scale_from_amax(torch.tensor(30.0))),
          "fp8-row": lambda: fp8.fake_quant_per_row(x),
          "absmax": lambda: fused.row_absmax(x)}[kernel]
    n = compiled[kernel].compiled_calls
    eager, comp = run_both(fn, monkeypatch)
    assert compiled[kernel].compiled_calls == n + 1
    assert same(eager, comp)
    if kernel == "absmax":
        assert same(x.abs().amax(-1), comp)


def test_new_sizes_do_not_recompile(compiled):
    from torch._dynamo.utils import counters

    nvfp4.fake_quant_with_global_scale(torch.randn(40, 128), torch.tensor(3.0))
    before = counters["stats"]["unique_graphs"]
    for shape in ((77, 128), (5, 3, 512), (129, 1024)):  # token counts, ranks, K
        nvfp4.fake_quant_with_global_scale(torch.randn(shape), torch.tensor(3.0))
    assert counters["stats"]["unique_graphs"] == before


def test_inside_moeq_interception(compiled, monkeypatch):
    """The quantized model's forward (fake quant inside moeq's TorchFunctionMode) runs the
    compiled kernels and gives the eager logits bit for bit."""
    import copy

    import moeq
    from tests.quantize.helpers import tm

    base = tm.tiny_model("qwen3_moe")
    ids = tm.random_input_ids(base, 2, 12)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MOEQ_COMPILE", flag)
        m = copy.deepcopy(base)
        moeq.quantize(m, "nvfp4", [ids], progress=False)
        n = compiled["nvfp4"].compiled_calls
        with torch.no_grad():
            out[flag] = m(input_ids=ids, use_cache=False).logits
        if flag == "1":
            assert compiled["nvfp4"].compiled_calls > n
    assert torch.equal(out["0"], out["1"])


def test_other_torch_function_mode_stays_eager(compiled):
    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    n = compiled["fp8"].compiled_calls
    with Mode():
        fp8.fake_quant_with_scale(torch.randn(8, 32), torch.tensor(0.01))
    assert compiled["fp8"].compiled_calls == n


def test_env_off(compiled, monkeypatch):
    monkeypatch.setenv("MOEQ_COMPILE", "0")
    n = compiled["fp8"].compiled_calls
    fp8.fake_quant_with_scale(torch.randn(8, 32), torch.tensor(0.01))
    assert compiled["fp8"].compiled_calls == n


def test_compile_failure_warns_once_then_eager(compiled, monkeypatch, caplog):
    k = compiled["fp8"]

    def broken(device_type):
        def fail(*a):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(k, "_get", broken)
    x, s = torch.randn(8, 32), torch.tensor(0.01)
    with caplog.at_level(logging.WARNING, logger="moeq"):
        a = fp8.fake_quant_with_scale(x, s)
        b = fp8.fake_quant_with_scale(x, s)
    assert k.failed and len([r for r in caplog.records if "no C++ compiler" in r.getMessage()]) == 1
    monkeypatch.setenv("MOEQ_COMPILE", "0")
    assert torch.equal(a, fp8.fake_quant_with_scale(x, s)) and torch.equal(a, b)


def test_auto_mode_compiles_only_after_its_payback(compiled, monkeypatch):
    """MOEQ_COMPILE unset (auto): a kernel runs eagerly until the elements it processed on the device reach
    PAYBACK_NUMEL, then compiled; short runs never pay for a compilation. MOEQ_COMPILE=1 compiles at once."""
    k = compiled["fp8"]
    x = sample(torch.float32)
    s = fp8.scale_from_amax(torch.tensor(30.0))
    monkeypatch.delenv("MOEQ_COMPILE")
    monkeypatch.setattr(fused, "PAYBACK_NUMEL", {"cpu": 3 * x.numel()})
    monkeypatch.setattr(k, "eager_numel", {})
    n = k.compiled_calls
    outs = [fp8.fake_quant_with_scale(x, s) for _ in range(4)]
    assert k.compiled_calls == n + 1 and k.eager_numel == {"cpu": 3 * x.numel()}  # 3 eager calls, then compiled
    assert all(same(outs[0], o) for o in outs[1:])
    monkeypatch.setenv("MOEQ_COMPILE", "1")
    monkeypatch.setattr(k, "eager_numel", {})
    fp8.fake_quant_with_scale(x, s)
    assert k.compiled_calls == n + 2 and k.eager_numel == {}
