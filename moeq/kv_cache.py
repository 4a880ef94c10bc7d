"""FP8 KV cache (`Recipe.kv_cache="fp8"`): one static float32 scale per attention layer for its
keys and one for its values, amax / 448 of what the attention kernel multiplies: the key AFTER
rotary embedding (vLLM applies k_scale to the post-rope key it writes to the cache) and the value.

Interception (same rules as `interception.py`): each attention module's call pushes a
`KVIntercept` mode. Operands are identified by their role in the attention ops, never by call
order: `F.scaled_dot_product_attention(q, k, v)` gives k and v directly; in the eager path the
softmax output (and what is sliced / cast / dropped out of it) is tracked by identity, so
`matmul(P, V)` names V, and the other activation x activation matmul, `matmul(Q, K^T)`, names
K^T. A call that shows neither exactly one sdpa nor one Q K^T and one P V (flash / flex
kernels, an unknown layout) raises `KVCacheError`. repeat_kv copies heads, so the amax is that
of the real heads. After calibration the same mode fake-quantizes k and v with their static
scales (elementwise: the scale is a scalar), so evaluation sees the cache's rounding.

Attention modules are found by structure: a `k_proj` and a `v_proj` submodule. MLA attention
(DeepSeek `kv_a_proj_with_mqa`) caches a compressed latent, not k and v: refused.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .calibration_stats import abs_amax
from .formats import fp8

_T = torch.Tensor
_MATMUL = {torch.matmul, _T.matmul, _T.__matmul__}
_SOFTMAX = {F.softmax, torch.softmax, _T.softmax}
# ops after which a tensor still holds (part of) the attention probabilities
_PROBS_KEEP = {F.dropout, _T.to, _T.__getitem__, _T.type_as, _T.contiguous, _T.float, _T.bfloat16, _T.half}


class KVCacheError(ValueError):
    """An attention layer whose k/v moeq cannot calibrate or name for the engines."""


def find_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention module with its own k_proj and v_proj; MLA refused."""
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "kv_a_proj_with_mqa") or hasattr(m, "kv_b_proj"):
            raise KVCacheError(
                f"{name} ({type(m).__name__}) is MLA attention: vLLM caches its compressed latent, not keys and values, "
                f"and moeq does not calibrate that scale; quantize without kv_cache='fp8'")
        if isinstance(getattr(m, "k_proj", None), nn.Module) and isinstance(getattr(m, "v_proj", None), nn.Module):
            out.append((name, m))
    return out


class AttentionState:
    """Calibration statistics (k_amax, v_amax: float32 scalars) and then the static scales of one
    attention module. batch: the session's BatchContext (padding tokens never count)."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        dev = module.k_proj.weight.device if hasattr(module.k_proj, "weight") else None
        self.amax = {"k": torch.zeros((), device=dev), "v": torch.zeros((), device=dev)}
        self.scale: dict[str, torch.Tensor] = {}
        self.mode = "calibrate"
        self.batch = None

    def reset_statistics(self) -> None:
        for a in self.amax.values():
            a.zero_()

    @torch.no_grad()
    def handle(self, kind: str, x: torch.Tensor, tokens_dim: int) -> torch.Tensor:
        """Observe (calibrate) or fake-quantize (quantize) k or v, x [B, heads, ...] with its
        tokens along `tokens_dim` (-2 for [B, H, T, D], -1 for K^T [B, H, D, T])."""
        if self.mode == "calibrate":  # max |x| read in place (no |x| or masked copy of k/v)
            mask = self.batch.token_mask if self.batch is not None else None
            if mask is None:
                a = abs_amax(x, tuple(range(x.dim())))
            else:
                b, t = x.shape[0], x.shape[tokens_dim]
                if b * t != mask.numel():
                    raise ValueError(f"{self.name}: its {kind} has {b} x {t} tokens but the batch has {mask.numel()}; "
                                     f"calibrate with unpadded batches")
                per_token = abs_amax(x, tuple(i for i in range(1, x.dim()) if i != tokens_dim % x.dim()))  # [B, T]
                a = torch.where(mask.reshape(b, t), per_token, 0).amax()
            torch.maximum(self.amax[kind], a.to(self.amax[kind].device), out=self.amax[kind])
            return x
        return fp8.fake_quant_with_scale(x, self.scale[kind].to(x.device))

    def finalize(self) -> None:
        for kind, a in self.amax.items():
            if not bool(a > 0):
                raise KVCacheError(f"{self.name}: no calibration token reached its attention ({kind} amax is 0), so "
                                   f"its {kind}_scale cannot be set; check that calibration runs this layer")
            self.scale[kind] = fp8.scale_from_amax(a)
        self.mode = "quantize"


class KVIntercept(TorchFunctionMode):
    """One call of one attention module; `seen` counts the recognized attention ops."""

    def __init__(self, state: AttentionState, info: dict):
        super().__init__()
        self.state = state
        self.seen = info.setdefault("seen", {"sdpa": 0, "qk": 0, "pv": 0})
        self._probs: dict[int, weakref.ref] = {}

    def _is_probs(self, t) -> bool:
        r = self._probs.get(id(t))
        return r is not None and r() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if func is F.scaled_dot_product_attention:
            args = list(args)
            for pos, kind in ((1, "k"), (2, "v")):
                if len(args) > pos:
                    args[pos] = st.handle(kind, args[pos], -2)
                else:
                    key = {"k": "key", "v": "value"}[kind]
                    kwargs = {**kwargs, key: st.handle(kind, kwargs[key], -2)}
            self.seen["sdpa"] += 1
            return func(*args, **kwargs)
        if func in _MATMUL and len(args) == 2 and all(_activation(a) for a in args) and args[1].dim() >= 3:
            a, b = args
            if self._is_probs(a):
                self.seen["pv"] += 1
                return func(a, st.handle("v", b, -2), **kwargs)
            self.seen["qk"] += 1
            return func(a, st.handle("k", b, -1), **kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and (func in _SOFTMAX or (func in _PROBS_KEEP and args and self._is_probs(args[0]))):
            self._probs[id(out)] = weakref.ref(out)
        return out


def _activation(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)


def check_call(state: AttentionState, impl: str | None):
    """Post-hook: the call showed one sdpa, or one Q K^T and one P V (else k/v went unseen)."""
    def after(output, info):
        seen = info.get("seen", {})
        if seen not in ({"sdpa": 1, "qk": 0, "pv": 0}, {"sdpa": 0, "qk": 1, "pv": 1}):
            raise KVCacheError(
                f"{state.name}: kv_cache='fp8' found {seen} attention ops in its forward (attn_implementation "
                f"{impl!r}); moeq reads k and v from eager or sdpa attention: load the model with "
                f"attn_implementation='sdpa' or 'eager'")
        return output
    return after
