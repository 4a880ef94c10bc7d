"""Scoped functional interception: observe and fake-quantize weights inside the
unmodified HF forward, under any experts implementation.

A fresh `TorchFunctionMode` is pushed by a forward pre-hook of each quantized module and
popped by a forward hook registered with `always_call=True` (so it is popped when the
forward raises). Torch function modes are thread-local, so two models running in two
threads never see each other's interception. Nothing in `torch` is reassigned. (The
per-module statistics are not locked: calibrate one model per thread.)

Inside the mode, operands are identified by IDENTITY: the module's own parameters, and
every view derived from them (an `[e]` index, a gather `[expert_ids]`, a transpose), each
tagged with an `Origin` that records the projection, the experts it covers and whether
it presents the weight as [K, N]. Matmul ops on a tagged weight (`F.linear`, `matmul`,
`bmm`, `torch._grouped_mm`, transformers' grouped_mm fallback op) learn per-row expert
ids from the origin or from the grouped-mm offsets. Any other op on an expert weight
raises `UnsupportedExpertsOp`: nothing is skipped silently.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .calibration_stats import ExpertsState, LinearState


class UnsupportedExpertsOp(RuntimeError):
    """An expert weight was used in a way moeq cannot attribute to experts."""


@dataclass(frozen=True, eq=False)
class Origin:
    proj: str
    experts: "None | int | torch.Tensor"  # None = whole [E, ...] stack; int / 0-d = one expert; 1-d = per row
    kn: bool  # True when the tensor presents the weight as [..., K, N]


_T = torch.Tensor
_METADATA_METHODS = {
    _T.size, _T.dim, _T.data_ptr, _T.stride, _T.storage_offset, _T.is_contiguous, _T.numel,
    _T.element_size, _T.__len__, _T.is_floating_point, _T.get_device, _T.nelement,
}
_METADATA_PROPS = {
    getattr(_T, n).__get__
    for n in ("device", "dtype", "shape", "ndim", "requires_grad", "is_cuda", "layout", "is_meta",
              "grad_fn", "is_leaf", "is_sparse", "is_quantized", "is_nested", "itemsize", "nbytes")
}
_TOGGLE_PROPS = {_T.T.__get__, _T.mT.__get__}
# Ops that keep which experts/rows a tensor covers (dtype casts, copies): the origin carries over.
_VIEW_KEEP = {_T.contiguous, _T.to, _T.detach, torch.detach, _T.clone, torch.clone, _T.float, _T.bfloat16, _T.half, _T.type_as}
_TRANSPOSE = {_T.transpose, torch.transpose, _T.t, torch.t, _T.swapaxes, torch.swapaxes}
_GROUPED = {torch._grouped_mm}


def _is_metadata(func) -> bool:
    try:
        return func in _METADATA_METHODS or func in _METADATA_PROPS
    except TypeError:  # unhashable callables
        return False


def _is_grouped_fallback(func) -> bool:
    """transformers' grouped_mm fallback custom op (its packet, or its overload as dynamo sees it)."""
    ns = getattr(torch.ops, "transformers", None)
    packet = getattr(ns, "grouped_mm_fallback", None) if ns is not None else None
    return packet is not None and (func is packet or func is getattr(packet, "default", None))


class _Intercept(TorchFunctionMode):
    """Base: origin bookkeeping for one forward call of one module."""

    def __init__(self, state, params: dict[str, torch.Tensor], stacked: bool):
        super().__init__()
        self.state = state
        # id -> (weak reference, origin): a view (e.g. a batched_mm gather of expert weights)
        # dies as soon as the forward drops it; a dead entry never matches a new tensor.
        self.origins: dict[int, tuple[weakref.ref, Origin]] = {}
        self.params = {id(p): name for name, p in params.items()}
        self._fq: dict[str, torch.Tensor] = {}  # this call's fake-quant weights, whole stacks
        for name, p in params.items():
            self._tag(p, Origin(name, None, state.stored_kn))
        self.stacked = stacked

    def _tag(self, t: torch.Tensor, origin: Origin) -> None:
        if len(self.origins) > 64:  # drop entries of views that are gone
            self.origins = {k: v for k, v in self.origins.items() if v[0]() is not None}
        self.origins[id(t)] = (weakref.ref(t), origin)

    def _origin(self, a):
        hit = self.origins.get(id(a)) if isinstance(a, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0]() is a else None

    def _tagged(self, args, kwargs):
        found = []
        for i, a in enumerate(args):
            if isinstance(a, (list, tuple)):
                found += [(i, b, o) for b in a if (o := self._origin(b)) is not None]
            elif (o := self._origin(a)) is not None:
                found.append((i, a, o))
        found += [(k, a, o) for k, a in kwargs.items() if (o := self._origin(a)) is not None]
        return found

    def _weight(self, a, origin: Origin):
        """In quantize mode a raw parameter is replaced by its fake-quant version, computed
        from the parameter itself once per module call."""
        if self.state.mode == "quantize" and origin.experts is None and id(a) in self.params:
            if origin.proj not in self._fq:
                self._fq[origin.proj] = self.state.weight_fq(origin.proj, a)
            return self._fq[origin.proj]
        return a

    def _fail(self, func, why: str):
        name = getattr(func, "__name__", repr(func))
        raise UnsupportedExpertsOp(
            f"{self.state.target.name} ({type(self.state.target.module).__name__}): op {name} {why}. "
            f"moeq cannot tell which experts this op multiplies, so it refuses to guess. "
            f"Run this module with another experts implementation (model.set_experts_implementation(...)), "
            f"exclude it in the recipe, or report the layout."
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_metadata(func):
            return func(*args, **kwargs)
        tagged = self._tagged(args, kwargs)
        if not tagged:
            return func(*args, **kwargs)
        if len(tagged) == 1 and tagged[0][0] == 0 and self._is_view(func):
            return self._view(func, args, kwargs, tagged[0][2])
        return self._matmul(func, args, kwargs, tagged)

    def _is_view(self, func) -> bool:
        return func is _T.__getitem__ or func in _TRANSPOSE or func in _VIEW_KEEP or func in _TOGGLE_PROPS

    def _view(self, func, args, kwargs, origin: Origin):
        src = args[0]
        if func is _T.__getitem__:
            idx = self._index(func, args[1], origin)
            one = isinstance(idx, int) or idx.dim() == 0
            if (one and self.state.mode == "quantize" and id(src) in self.params
                    and origin.proj not in self._fq):  # eager: fake-quantize only the expert it runs
                out = self.state.weight_fq(origin.proj, src, idx)
            else:
                out = func(self._weight(src, origin), *args[1:], **kwargs)
            self._tag(out, Origin(origin.proj, idx, origin.kn))
            return out
        out = func(self._weight(src, origin), *args[1:], **kwargs)
        if func in _VIEW_KEEP:
            new = origin
        else:
            if func in _TRANSPOSE and len(args) + len(kwargs) > 1:
                dims = [d % src.dim() for d in list(args[1:]) + list(kwargs.values())]
                if sorted(dims) != [src.dim() - 2, src.dim() - 1]:
                    self._fail(func, f"transposes dims {dims} of an expert weight (only the last two are supported)")
            elif func is _T.T.__get__ and src.dim() != 2:
                self._fail(func, "uses .T on a 3-D expert weight")
            new = Origin(origin.proj, origin.experts, not origin.kn)
        self._tag(out, new)
        return out

    def _index(self, func, idx, origin: Origin):
        if origin.experts is not None or not self.stacked:
            self._fail(func, "indexes an already indexed expert weight")
        if isinstance(idx, tuple):
            if not idx or any(not (i is Ellipsis or (isinstance(i, slice) and i == slice(None))) for i in idx[1:]):
                self._fail(func, f"indexes an expert weight with {idx!r} (only [experts] is supported)")
            idx = idx[0]
        if isinstance(idx, int) or (isinstance(idx, torch.Tensor) and idx.dim() <= 1
                                    and not idx.is_floating_point() and idx.dtype != torch.bool):
            return idx
        self._fail(func, f"indexes an expert weight with {type(idx).__name__} (only int / LongTensor ids)")


class ExpertsIntercept(_Intercept):
    """info: what the module's pre-hook already did for the first projection's input in this
    call ("observed": statistics from the routing; "quantized": fake-quantized once per token)."""

    def __init__(self, state: ExpertsState, info: dict | None = None):
        t = state.target
        super().__init__(state, {p: t.param(p) for p in t.projs}, stacked=True)
        self.info = info or {}

    def _matmul(self, func, args, kwargs, tagged):
        if len(tagged) != 1:
            self._fail(func, "takes two expert weights")
        pos, w, origin = tagged[0]
        args = list(args)
        if func is F.linear and pos == 1 and not origin.kn:
            x_pos, kdim, rows = 0, -1, origin.experts
        elif func in (torch.matmul, _T.matmul, _T.__matmul__) and pos == 1 and origin.kn:
            x_pos, kdim, rows = 0, -1, origin.experts
        elif func is torch.bmm and pos == 0 and not origin.kn:
            x_pos, kdim, rows = 1, -2, origin.experts
        elif func is torch.bmm and pos == 1 and origin.kn:
            x_pos, kdim, rows = 0, -1, origin.experts
        elif (func in _GROUPED or _is_grouped_fallback(func)) and pos in (1, "mat_b", "weight") and origin.kn:
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            if offs is None or origin.experts is not None:
                self._fail(func, "is a grouped mm without offsets over the whole expert stack")
            x_pos, kdim, rows = 0, -1, ("offs", offs)
        else:
            self._fail(func, f"uses the expert weight {origin.proj} as operand {pos} (kn={origin.kn})")
        if rows is None:
            self._fail(func, f"multiplies the whole {origin.proj} stack without expert ids or offsets")
        if not isinstance(rows, tuple):
            rows = ("one", rows) if isinstance(rows, int) or rows.dim() == 0 else ("ids", rows)
        x = args[x_pos]
        xk = x.transpose(-1, -2) if kdim == -2 else x
        st = self.state
        first = origin.proj == st.target.projs[0]
        if st.mode == "calibrate":
            if first and self.info.get("observed"):
                st.calls += 1
            else:
                st.observe(origin.proj, xk, rows, self.info.get("valid_rows"))
        else:
            if isinstance(pos, int):
                args[pos] = self._weight(w, origin)
            else:
                kwargs = {**kwargs, pos: self._weight(w, origin)}
            if not (first and self.info.get("quantized")):
                xk = st.fake_quant_input(origin.proj, xk, rows)
                args[x_pos] = xk.transpose(-1, -2) if kdim == -2 else xk
            if st.sinks:  # layer-sequential GPTQ: the rows the quantized matmul multiplies
                st.feed_rows(origin.proj, xk, rows, self.info.get("valid_rows"))
        return func(*args, **kwargs)


class LinearIntercept(_Intercept):
    def __init__(self, state: LinearState, _info: dict | None = None):
        super().__init__(state, {"weight": state.target.module.weight}, stacked=False)

    def _matmul(self, func, args, kwargs, tagged):
        if not (func is F.linear and len(tagged) == 1 and tagged[0][0] == 1 and not tagged[0][2].kn):
            self._fail(func, "uses the Linear weight outside F.linear(input, weight)")
        args = list(args)
        st = self.state
        if st.mode == "calibrate":
            st.observe(args[0])
        else:
            args[1] = self._weight(args[1], tagged[0][2])
            args[0] = st.fake_quant_input(args[0])
            if st.sinks:  # layer-sequential GPTQ: the rows the quantized matmul multiplies
                st.feed(args[0])
        return func(*args, **kwargs)


def _pop_if_top(mode: TorchFunctionMode) -> None:
    """Exit `mode` if it is the innermost torch function mode of this thread."""
    n = torch._C._len_torch_function_stack()
    if n and torch._C._get_function_stack_at(n - 1) is mode:
        mode.__exit__(None, None, None)


class Hooks:
    """Pre/post forward hooks that scope one intercept mode to each module call.

    The post hook runs with always_call=True, so an exception in the forward pops the mode.
    A KeyboardInterrupt (a BaseException) skips torch's always_call hooks, so each hooked
    module's forward is also wrapped (an instance attribute, as accelerate's hooks do; the
    class is untouched) in a guard that pops the module's modes on any BaseException: after
    a Ctrl-C the model is immediately usable (state_dict, export, plain tensor ops).
    `after(output, info)`, when given, may replace the module's output.
    """

    def __init__(self):
        self.handles = []
        self.by_module: dict[int, list] = {}
        self._local = threading.local()

    def attach(self, module: torch.nn.Module, make_mode, before=None, after=None):
        def pre(mod, args, kwargs):
            stack = self._stack(mod)
            while stack:  # stale: an interrupted call of this (non-reentrant) module
                _pop_if_top(stack.pop())
            info = {}
            if before is not None:
                args, kwargs, info = before(args, kwargs)
            mode = make_mode(info)
            mode.moeq_call_info = info
            mode.__enter__()
            stack.append(mode)
            return args, kwargs

        def post(mod, args, kwargs, output):
            stack = self._stack(mod)
            if stack:
                mode = stack.pop()
                _pop_if_top(mode)
                if after is not None:
                    return after(output, mode.moeq_call_info)
            return None

        pair = [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post, with_kwargs=True, always_call=True),
                _ForwardGuard(module, self)]
        self.by_module.setdefault(id(module), []).extend(pair)
        self.handles.extend(pair)

    def _stack(self, mod) -> list:
        stacks = self._local.__dict__.setdefault("stacks", {})
        return stacks.setdefault(id(mod), [])

    def pop_modes(self, module: torch.nn.Module) -> None:
        """Exit every mode this thread holds for `module` (innermost first)."""
        stacks = self._local.__dict__.get("stacks", {})
        for mode in reversed(stacks.pop(id(module), [])):
            _pop_if_top(mode)

    def remove(self, module: torch.nn.Module | None = None):
        """Remove the hooks of one module, or all of them (and any mode left on this thread)."""
        stacks = self._local.__dict__.get("stacks", {})
        for key in ([id(module)] if module is not None else list(stacks)):
            for mode in reversed(stacks.pop(key, [])):
                _pop_if_top(mode)
        handles = self.by_module.pop(id(module), []) if module is not None else self.handles
        for h in reversed(handles):
            h.remove()
        if module is None:
            self.handles.clear()
            self.by_module.clear()


class _ForwardGuard:
    """Wraps `module.forward` (instance attribute) so that any BaseException leaving the
    forward pops the module's intercept modes; `remove()` restores what was there."""

    def __init__(self, module: torch.nn.Module, hooks: Hooks):
        self.module = module
        self.had_own = "forward" in module.__dict__
        self.previous = module.__dict__.get("forward")
        inner = module.forward

        def forward(*args, **kwargs):
            try:
                return inner(*args, **kwargs)
            except BaseException:
                hooks.pop_modes(module)
                raise

        forward.moeq_guard = True  # how tests (and users) recognize it
        self.wrapper = forward
        module.forward = forward

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self.wrapper:
            if self.had_own:
                self.module.forward = self.previous
            else:
                del self.module.forward
