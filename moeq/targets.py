"""Find what gets quantized: fused experts modules and nn.Linear layers, by structure.

An experts module is any module the transformers decorator `use_experts_implementation`
set up (it carries the `has_gate` / `is_transposed` flags) and that owns 3-D parameters:
`gate_up_proj [E, 2I, H]` (or `up_proj [E, I, H]` when has_gate=False) and
`down_proj [E, H, I]`; transposed classes store `[E, K, N]`. No class-name lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .recipes import Recipe

# Sibling projections that serving engines fuse into one GEMM (q/k/v -> qkv, gate/up ->
# gate_up, Qwen3.5 linear attention qkv/z -> qkvz). They must share the weight global
# scale and the input scale, so the export loads without requantization.
SHARED_SCALE_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("in_proj_qkv", "in_proj_z"),
    ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek MLA: vLLM loads them as one fused_qkv_a_proj
)


class CoverageError(RuntimeError):
    """A weight would be left unquantized without being excluded."""


@dataclass(eq=False)
class ExpertsTarget:
    """One fused experts module. Projections are named as on the module: first
    ("gate_up_proj" or "up_proj") and "down_proj"."""

    name: str
    module: nn.Module
    has_gate: bool
    is_transposed: bool
    is_concatenated: bool
    num_experts: int
    projs: tuple[str, str] = field(default=("gate_up_proj", "down_proj"))

    def param(self, proj: str) -> nn.Parameter:
        return getattr(self.module, proj)

    def nk(self, proj: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as [E, N, K] (K = input dim, along which blocks run); a view."""
        w = self.param(proj) if tensor is None else tensor
        return w.transpose(-2, -1) if self.is_transposed else w

    def from_nk(self, w_nk: torch.Tensor) -> torch.Tensor:
        """[E, N, K] back to the module's storage layout, contiguous."""
        return (w_nk.transpose(-2, -1) if self.is_transposed else w_nk).contiguous()

    def gate_up_rows(self, n: int) -> tuple[slice, slice]:
        """Row selectors (along N of the [E, N, K] view) of the gate and up halves."""
        if self.is_concatenated:
            return slice(0, n // 2), slice(n // 2, n)
        return slice(0, n, 2), slice(1, n, 2)  # interleaved gate0, up0, gate1, ...


@dataclass(eq=False)
class LinearTarget:
    name: str
    module: nn.Linear
    group: tuple[str, ...] = ()  # names of siblings sharing scales (including itself)


@dataclass
class Targets:
    experts: list[ExpertsTarget]
    linears: list[LinearTarget]
    excluded: list[str]  # module names matched by an exclude pattern that hold weights
    attention: list[tuple[str, nn.Module]] = field(default_factory=list)  # kv_cache: (name, attention module)


def is_experts_module(m: nn.Module) -> bool:
    has_3d = any(p.dim() == 3 for p in m.parameters(recurse=False))
    return has_3d and hasattr(m, "has_gate") and hasattr(m, "is_transposed")


def find_targets(model: nn.Module, recipe: Recipe) -> Targets:
    """Classify every weight of the model; raise CoverageError for anything left over."""
    experts, linears, excluded, unknown = [], [], [], []
    for name, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        if recipe.excludes(name) or isinstance(m, nn.modules.conv._ConvNd):
            excluded.append(name)  # convolutions have no quantized layout in the engines: by type, not name
            continue
        if is_experts_module(m):
            first = "gate_up_proj" if m.has_gate else "up_proj"
            projs = (first, "down_proj")
            for p in projs:
                if own.get(p) is None or own[p].dim() != 3:
                    raise CoverageError(
                        f"experts module {name} ({type(m).__name__}) has no 3-D parameter {p!r}; "
                        f"moeq supports the transformers experts layout (gate_up_proj/up_proj + down_proj). "
                        f"Exclude it with the pattern {name!r} to leave it unquantized."
                    )
            extra = [p for p, t in own.items() if t.dim() == 3 and p not in projs]
            unknown += [f"{name}.{p}" for p in extra]
            experts.append(
                ExpertsTarget(
                    name, m, bool(m.has_gate), bool(m.is_transposed),
                    bool(getattr(m, "is_concatenated", True)), own[projs[1]].shape[0], projs,
                )
            )
        elif isinstance(m, nn.Linear):
            linears.append(LinearTarget(name, m))
        else:
            unknown += [f"{name}.{p}" for p, t in own.items() if t.dim() == 3]
    if unknown:
        raise CoverageError(
            "these 3-D weights are neither in a recognized experts module nor excluded: "
            + ", ".join(unknown) + ". Add exclude patterns for them (Recipe.with_exclude) "
            "or report the layout to moeq."
        )
    _assign_sibling_groups(linears)
    attention = []
    if recipe.kv_cache is not None:
        from .kv_cache import find_attention

        attention = find_attention(model)
    return Targets(experts, linears, excluded, attention)


def _assign_sibling_groups(linears: list[LinearTarget]) -> None:
    by_name = {t.name: t for t in linears}
    for t in linears:
        parent, _, leaf = t.name.rpartition(".")
        for sibs in SHARED_SCALE_SIBLINGS:
            if leaf in sibs:
                prefix = f"{parent}." if parent else ""
                t.group = tuple(prefix + s for s in sibs if prefix + s in by_name)
        if len(t.group) < 2:
            t.group = (t.name,)
