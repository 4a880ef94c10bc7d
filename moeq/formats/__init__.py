"""Number formats as pure tensor functions: quantize / dequantize / fake_quant / pack / unpack.

`fp4` (E2M1 element codes), `nvfp4`, `fp8`, `int4`, `mx` (MXFP4 / MXFP8: E8M0 scale per 32). No module state; every function
accepts leading batch dims so a stacked expert tensor [E, N, K] is one call.
"""

from . import fp4, fp8, int4, nvfp4
from . import mx

__all__ = ["fp4", "fp8", "int4", "nvfp4"]
__all__ += ["mx"]
