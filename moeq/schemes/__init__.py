"""Quantization schemes: one object per weight format and per input (activation) format,
stating its granularity and everything the pipeline does with it (fake quant in memory,
the tensors it writes in each checkpoint layout, how to read them back, what `inspect`
checks). quantizer, export layouts, load and inspect dispatch through `table.WEIGHT` /
`table.INPUT`; adding a format = its own module here plus lines in `table.py`.

The numeric core stays in `moeq.formats` (pure tensor functions); these modules only
bind those functions to a granularity and a checkpoint convention.
"""
