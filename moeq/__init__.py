"""moeq: post-training quantization of fused-expert MoE models in transformers v5.

    import moeq
    report = moeq.quantize(model, "nvfp4", calib_data)   # fake-quant in place
    moeq.export(model, "out", layout="modelopt")         # or "compressed-tensors"
    model2 = moeq.load("out")                              # same logits, fake-quant

The public names are imported on first use (PEP 562), so `moeq --help` and argument
errors answer without loading torch and transformers (~6 s).
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "evaluate": (".evaluate", None),
    "DEMO_MODEL": (".data", "DEMO_MODEL"),
    "ExportReport": (".export", "ExportReport"),
    "export": (".export", "export"),
    "load": (".export", "load"),
    "QuantReport": (".quantize", "QuantReport"),
    "quantize": (".quantize", "quantize"),
    "PRESETS": (".recipes", "PRESETS"),
    "Recipe": (".recipes", "Recipe"),
    "get_recipe": (".recipes", "get_recipe"),
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'moeq' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__


class _Module(types.ModuleType):
    """Importing the submodule `moeq.quantize` (or the subpackage `moeq.export`) makes the
    import system set that name on `moeq` to the module; the public names are the functions,
    so such assignments are ignored (submodules stay reachable through sys.modules, which is
    what imports use)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name, (None, None))[1] is not None:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Module
