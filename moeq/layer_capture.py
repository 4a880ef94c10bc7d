"""Decoder layers one at a time: find them, and record each layer's call arguments.

Used where a model is run layer by layer on recorded inputs instead of end to end:
streaming quantization (weights materialized per layer) and layer-sequential GPTQ
(each layer's Hessians from the outputs of the already-quantized layers before it).
One capture pass replaces every decoder layer by a `_Catcher` that records its call
(position embeddings, per-layer-type attention masks, ...) and passes the hidden states
through unchanged; the last one stops the forward, so no layer runs.
"""

from __future__ import annotations

from torch import nn


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer i during the capture pass: records its call, passes
    hidden states through unchanged, and stops the forward after the last layer."""

    def __init__(self, layer: nn.Module, i: int, calls: list, last: bool):
        super().__init__()
        self.layer, self.i, self.calls, self.last = layer, i, calls, last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states if self.i == 0 else None, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the longest list of same-class blocks."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m} - {type(None)}) >= 1:
            n_layers = getattr(getattr(model.config, "text_config", model.config), "num_hidden_layers", None)
            if (best is None or len(m) > len(best[1])) and (n_layers is None or len(m) == n_layers):
                best = (name, m)
    if best is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; streaming needs a ModuleList of layers")
    return best


def capture_calls(layers: nn.ModuleList, run_batches) -> list[list]:
    """calls[i][b] = (hidden_states of batch b if i == 0 else None, args, kwargs) of layer i's
    call on batch b. run_batches() runs the model's forward on every batch (each call ends
    in _Stop, which it must let through or swallow per batch)."""
    calls: list[list] = [[] for _ in layers]
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, i, calls[i], last=i == len(layers) - 1)
    try:
        run_batches()
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return calls


def layer_output(o):
    """A decoder layer's hidden states out of whatever it returns."""
    return o[0] if isinstance(o, tuple) else o
