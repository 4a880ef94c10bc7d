"""moeq: post-training quantization of fused-expert MoE models in transformers v5.

    import moeq
    report = moeq.quantize(model, "nvfp4", calib_data)   # fake-quant in place
    moeq.export(model, "out", layout="modelopt")         # or "compressed-tensors"
    model2 = moeq.load("out")                              # same logits, fake-quant
"""

__version__ = "0.1.0"

from . import evaluate
from .data import DEMO_MODEL
from .export import ExportReport, export, load
from .quantize import QuantReport, quantize
from .recipes import PRESETS, Recipe, get_recipe

__all__ = [
    "DEMO_MODEL", "PRESETS", "ExportReport", "QuantReport", "Recipe",
    "evaluate", "export", "get_recipe", "load", "quantize", "__version__",
]
