"""moeq: post-training quantization of fused-expert MoE models in transformers v5.

    import moeq
    report = moeq.quantize(model, "nvfp4", calib_data)   # fake-quant in place
"""

from .quantize import QuantReport, quantize
from .recipes import PRESETS, Recipe, get_recipe

__all__ = ["PRESETS", "QuantReport", "Recipe", "get_recipe", "quantize"]

__version__ = "0.1.0"

from .export import ExportReport, export, load  # noqa: E402

__all__ += ["ExportReport", "export", "load", "__version__"]
