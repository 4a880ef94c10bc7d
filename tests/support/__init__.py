"""The supported-models sweep: every fused-experts MoE of the installed transformers, quantized, exported and
reloaded (see :mod:`support.sweep`); ``scripts/support_table.py`` renders its results into the README."""
