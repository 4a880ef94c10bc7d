"""One fused pass per tensor for the elementwise hot paths (activation and weight fake
quant, calibration max |x|), through `torch.compile`: inductor turns each into one C++
loop on CPU and one Triton kernel on CUDA, where eager PyTorch makes ~13 passes (NVFP4).

    fq = Fused(kernel, "nvfp4 fake quant", static_last=True)
    y = fq(xb, gs, six)   # compiled where it pays, kernel(xb, gs, six) eagerly otherwise

Invariants:
- the compiled result equals the eager result bit for bit (NaN positions included; a NaN's
  sign bit may differ). Kernels are written for it: every division is by a tensor, never by
  a Python number (inductor turns `x / 6.0` into `x * (1 / 6.0)` on CUDA), and on CUDA the
  Triton division is IEEE-rounded and denormals are kept (`_CUDA_OPTIONS`).
  tests/formats/test_fused.py (CPU) and tests/formats/test_cuda.py (CUDA) check it.
- one compiled graph per (kernel, dtype, device): every dim is marked dynamic except a
  static block dim (`static_last`), so token counts, expert chunks and K never recompile.
  Callers flatten leading dims (`rows`) so ranks do not multiply graphs either.
- MOEQ_COMPILE=auto (the default) compiles a kernel on a device only once its eager calls there
  have processed `PAYBACK_NUMEL` elements (seconds of eager work, more than a compilation costs),
  so short runs (the demo's quantize / eval, tests) never pay for compiling; MOEQ_COMPILE=1
  compiles at the first call (benchmarks), MOEQ_COMPILE=0 never.
- eager whenever compiling would not pay or is not safe: MOEQ_COMPILE=0, tensors under
  `min_numel` elements, a torch function mode active on this thread (dynamo would trace
  the mode), grad-requiring inputs, already inside a torch.compile'd region. A failed
  compilation logs one warning and the kernel stays eager for the rest of the process.
Compiled graphs go through inductor's on-disk FX graph cache, so a second run pays ~1 s
per kernel instead of the first run's ~5-10 s.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("moeq")

# Below this many elements a kernel launch / guard check costs more than the passes it saves.
MIN_NUMEL = 1 << 16

# Triton's default fp32 division is approximate and flushes denormals: ask for eager's numerics.
_CUDA_OPTIONS = {"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True,
                 "emulate_precision_casts": True}


# Eager elements a kernel processes on a device before auto mode compiles it there. Estimates from
# bench/RESULTS.md: eager NVFP4 fake quant runs ~10-50 M elements/s on 2 CPU cores and a compilation
# costs ~5-10 s (cold), so 2**28 elements is ~5-25 s of eager work; on an H100/H200 eager runs
# billions of elements/s and compiling saved ~20-35 % of the fake-quant forward.
PAYBACK_NUMEL = {"cpu": 1 << 28, "cuda": 1 << 35}


def mode() -> str:
    """MOEQ_COMPILE: "off" (0/off/false/no), "on" (1/on/true/yes: compile at once) or "auto" (default)."""
    v = os.environ.get("MOEQ_COMPILE", "auto").strip().lower()
    return "off" if v in ("0", "off", "false", "no") else "on" if v in ("1", "on", "true", "yes") else "auto"


def rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [R, K] (a view when x is contiguous)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def per_row(p: torch.Tensor, x: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """A float32 parameter broadcastable against x[..., :1] as [R, 1] (+ `extra` unit dims):
    the kernels see one parameter shape whatever the granularity (tensor, expert, row)."""
    p = p.to(torch.float32).expand(*x.shape[:-1], 1)
    return p.reshape((x.numel() // x.shape[-1], 1) + (1,) * extra).contiguous()  # one stride pattern: one graph


_consts: dict[tuple, torch.Tensor] = {}


def const(v: float, device) -> torch.Tensor:
    """0-d float32 tensor v on device, made once: a divisor compilers cannot fold."""
    key = (v, str(device))
    t = _consts.get(key)
    if t is None:
        t = _consts[key] = torch.full((), v, dtype=torch.float32, device=device)
    return t


class Fused:
    """kernel(*tensors) compiled once (dynamic shapes) and called where it pays; the eager
    kernel otherwise. The first argument decides size, device and whether to compile."""

    def __init__(self, kernel, name: str, static_last: bool = False, min_numel: int = MIN_NUMEL,
                 devices: tuple[str, ...] = ("cpu", "cuda")):
        self.kernel, self.name, self.static_last, self.min_numel = kernel, name, static_last, min_numel
        self.devices = devices  # device types where compiling paid off in bench/bench_moe.py
        self._compiled: dict[str, object] = {}  # device type -> compiled callable
        self.failed = False
        self.compiled_calls = 0  # calls that ran the compiled kernel (tests, benchmarks)
        self.eager_numel: dict[str, int] = {}  # device type -> elements run eagerly while they could compile

    def use_compiled(self, args) -> bool:
        x, m = args[0], mode()
        if not self._may_compile(args, m):
            return False
        if m == "auto":  # compile once the eager work done here would have paid for it
            dev = x.device.type
            if self.eager_numel.get(dev, 0) < PAYBACK_NUMEL.get(dev, 0):
                self.eager_numel[dev] = self.eager_numel.get(dev, 0) + x.numel()
                return False
        return True

    def _may_compile(self, args, m: str) -> bool:
        return (not self.failed and m != "off" and args[0].numel() >= self.min_numel
                and args[0].device.type in self.devices
                and torch._C._len_torch_function_stack() == 0 and torch._C._is_torch_function_enabled()
                and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)))

    def _get(self, device_type: str):
        fn = self._compiled.get(device_type)
        if fn is None:
            opts = dict(_CUDA_OPTIONS) if device_type == "cuda" else {}
            fn = self._compiled[device_type] = torch.compile(self.kernel, dynamic=None, options=opts)
        return fn

    def _mark(self, args):
        for a in args:
            if isinstance(a, torch.Tensor):
                last = a.dim() - 1 if self.static_last and a is args[0] else a.dim()
                for d in range(last):
                    torch._dynamo.maybe_mark_dynamic(a, d)

    def __call__(self, *args):
        x = args[0]
        if not self.use_compiled(args):
            return self.kernel(*args)
        try:
            # detached aliases: a view's base would enter the guards (one graph per base shape);
            # no_grad: one graph whatever the caller's grad mode (no input requires grad here)
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            self._mark(args)
            with torch.no_grad():
                out = self._get(x.device.type)(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager from now on
            out = self.kernel(*args)  # an error of the inputs themselves is raised here, eagerly
            self.failed = True
            log.warning("moeq: torch.compile of the %s kernel failed (%s: %s); running it eagerly from now on "
                        "(set MOEQ_COMPILE=0 to skip compiling)", self.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return out
        self.compiled_calls += 1
        return out


def _row_absmax(x2: torch.Tensor) -> torch.Tensor:
    return x2.abs().amax(-1).float()


# Not compiled by default (devices=()): calibration with the compiled reduction was no faster on CPU
# (bench_moe.py --compile both, 16 experts: 0.97x vs 0.87x of the plain forward), slower on an H200
# (1.92-1.96x vs 1.66-1.68x), and compiling it added 5-8 s to the demo's `moeq quantize` (22 s).
# tests/formats/test_fused.py keeps its compiled form bit-exact, should a device make it pay.
_ROW_ABSMAX = Fused(_row_absmax, "max |x|", devices=())


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim, float32 of shape x.shape[:-1] (x.abs().amax(-1).float(); one read
    of x and no |x| copy where compiled)."""
    return _ROW_ABSMAX(rows(x)).reshape(x.shape[:-1])
