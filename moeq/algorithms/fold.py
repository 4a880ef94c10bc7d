"""Exact AWQ folds: scale a weight's input channels by s and the producer of its input by 1/s,
so that the unquantized model computes the same function (up to rounding).

Pure parameter edits on modules, no statistics. Two producers are folded:
- a norm: y = n(x) * (offset + w) [+ b]; its effective weight (and bias) divided by s. The
  offset (0 for `x * w`, 1 for the Qwen3.5 / Qwen3-Next / Gemma `x * (1 + w)`) is probed
  by running the norm (`norm_offset`), never read from a class name.
- the up half of a gated MLP, act(gate) * up: up rows (and bias) divided by s, which
  scales the activation handed to down_proj by 1/s exactly (`gate_is_linear_in_up`
  checks that on the module's own `_apply_gate`; gpt-oss's `(up + 1) * glu(gate)` fails it).
Consumers get columns multiplied by s: nn.Linear weights [N, K], fused experts [E, N, K]
views and router-like 2-D weights [E, K] used as F.linear(x, weight).
"""

from __future__ import annotations

import torch
from torch import nn


def experts_nk(m: nn.Module, proj: str) -> torch.Tensor:
    """A fused experts parameter as an [E, N, K] view (K = input dim)."""
    w = getattr(m, proj)
    return w.transpose(-2, -1) if m.is_transposed else w


def first_proj(m: nn.Module) -> str:
    return "gate_up_proj" if m.has_gate else "up_proj"


def up_rows(m: nn.Module, n: int) -> slice:
    """The up half of gate_up_proj along N (concatenated [gate; up] or interleaved)."""
    return slice(n // 2, n) if getattr(m, "is_concatenated", True) else slice(1, n, 2)


@torch.no_grad()
def norm_offset(norm: nn.Module, k: int) -> float | None:
    """0.0 for y = n(x) * w, 1.0 for y = n(x) * (1 + w), None for anything else. Probed with
    the weight set to 0 and to 1 (bias zeroed) on random rows; the weights are restored."""
    w = norm.weight
    b = getattr(norm, "bias", None)
    b = b if isinstance(b, torch.Tensor) and b.shape == w.shape else None
    saved = w.detach().clone(), None if b is None else b.detach().clone()
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    try:
        if b is not None:
            b.zero_()
        w.zero_()
        y0 = norm(x).float()
        w.fill_(1.0)
        y1 = norm(x).float()
    finally:
        w.copy_(saved[0])
        if b is not None:
            b.copy_(saved[1])
    d = y1 - y0  # n(x)
    if not isinstance(y0, torch.Tensor) or d.abs().max() == 0:
        return None
    tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
    for off in (0.0, 1.0):
        if (y0 - off * d).abs().max() <= tol * d.abs().max():
            return off
    return None


@torch.no_grad()
def fold_norm(norm: nn.Module, offset: float, s: torch.Tensor) -> None:
    """(offset + w) / s and b / s, computed in float32."""
    w = norm.weight
    w.copy_(((offset + w.float()) / s.to(w.device) - offset).to(w.dtype))
    b = getattr(norm, "bias", None)
    if isinstance(b, torch.Tensor) and b.shape == w.shape:
        b.copy_((b.float() / s.to(b.device)).to(b.dtype))


@torch.no_grad()
def scale_columns(w_nk: torch.Tensor, s: torch.Tensor) -> None:
    """w_nk [..., N, K] (a view of a parameter) *= s [..., K] along K, computed in float32."""
    w_nk.copy_((w_nk.float() * s.to(w_nk.device).unsqueeze(-2)).to(w_nk.dtype))


@torch.no_grad()
def scale_rows(w_nk: torch.Tensor, s: torch.Tensor) -> None:
    """w_nk [..., N, K] /= s [..., N] along N (bias [..., N]: pass it with a trailing dim)."""
    w_nk.copy_((w_nk.float() / s.to(w_nk.device).unsqueeze(-1)).to(w_nk.dtype))


@torch.no_grad()
def gate_is_linear_in_up(m: nn.Module) -> bool:
    """True when the experts' activation is act(gate) * up: dividing the up half by c divides
    the output by c, on random inputs."""
    if not m.has_gate or not hasattr(m, "_apply_gate"):
        return False
    w = experts_nk(m, "gate_up_proj")
    n = w.shape[-2]
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(8, n, generator=g) * 4).to(w.device, w.dtype)
    c = (torch.rand(n // 2, generator=g) * 3 + 0.5).to(w.device, torch.float32)
    h2 = h.float().clone()
    h2[:, up_rows(m, n)] /= c
    try:
        y, y2 = m._apply_gate(h).float(), m._apply_gate(h2.to(w.dtype)).float()
    except Exception:
        return False
    tol = 2e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return y.shape == y2.shape and bool(((y2 * c - y).abs() <= tol * (1 + y.abs())).all())
