"""moeq: post-training quantization of fused-expert MoE models in transformers v5.

    import moeq
    report = moeq.quantize(model, "nvfp4", calib_data)   # fake-quant in place
    moeq.export(model, "out", layout="modelopt")         # or "compressed-tensors"
    model2 = moeq.load("out")                              # same logits, fake-quant

The public names are imported on first use (PEP 562), so `moeq --help` and argument
errors answer without loading torch and transformers (~6 s). No submodule is named like
a public function (`moeq.quantization`, `moeq.checkpoint`), so importing one never
shadows `moeq.quantize` / `moeq.export`.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "evaluate": (".evaluate", None),
    "DEMO_MODEL": (".data", "DEMO_MODEL"),
    "ExportReport": (".checkpoint", "ExportReport"),
    "export": (".checkpoint", "export"),
    "load": (".checkpoint", "load"),
    "QuantReport": (".quantization", "QuantReport"),
    "quantize": (".quantization", "quantize"),
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

