"""`moeq.load`: read a ModelOpt or compressed-tensors checkpoint back into transformers
with fake-quant semantics (weights dequantized from the stored codes, inputs fake-quantized
with the stored static scales), so it reproduces the in-memory quantized model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn

from ..quantization import SESSION_ATTR, Session
from ..recipes import Recipe
from ..schemes.mxfp4 import native_read
from ..schemes.table import INPUT, WEIGHT
from ..targets import find_targets
from .export import SIDECAR, expert_units
from .layouts import NATIVE, kv_cache_names, recipe_from_config
from .plan import checkpoint_plan, fill_from_checkpoint


class CheckpointReader:
    """Lazy key -> tensor access over model.safetensors or an index of shards."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").exists():
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json")
        self.path, self.files, self._open = path, files, {}

    def release(self) -> None:
        """Close the shard files: their mapped pages stop counting toward this process's memory."""
        self._open.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.files:
            raise KeyError(f"checkpoint {self.path} has no tensor {key}")
        name = self.files[key]
        if name not in self._open:
            self._open[name] = safe_open(str(self.path / name), "pt")
        return self._open[name].get_tensor(key)


def _read_quantized(r: CheckpointReader, layout: str, recipe: Recipe, stem: str, dtype, n_k: tuple[int, int]):
    """-> (dequantized [N, K] weight, static input parameter or None). Tensors are `stem + name`;
    n_k: the module's [N, K] (what an int4 `weight_shape` says, when the checkpoint has one)."""
    w = WEIGHT[recipe.weight].read(r, layout, stem, dtype, n_k)
    prm = None if recipe.input is None else INPUT[recipe.input].read(r, layout, stem)
    return w, prm


def _is_quantized(r: CheckpointReader, prefix: str) -> bool:
    return f"{prefix}.weight_scale" in r


def _collapse(prms: list) -> torch.Tensor | None:
    if not prms or prms[0] is None:
        return None
    t = torch.stack([p.float() for p in prms])
    return t[0] if bool((t == t[0]).all()) else t


def _model_from_config(path: Path, dtype, experts_implementation):
    config = transformers.AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModelForCausalLM
    kw = {"dtype": dtype or getattr(config, "dtype", None) or torch.float32}
    if experts_implementation:
        kw["experts_implementation"] = experts_implementation
    model = cls._from_config(config, **kw) if hasattr(cls, "_from_config") else cls.from_config(config, **kw)
    return model.eval()


@torch.no_grad()
def load(path, *, dtype: torch.dtype | None = None, experts_implementation: str | None = None) -> nn.Module:
    """Load a moeq / ModelOpt / compressed-tensors export as a fake-quantized transformers model."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if qc is None and (path / "hf_quant_config.json").exists():
        qc = json.loads((path / "hf_quant_config.json").read_text())
    if qc is None:
        raise ValueError(f"{path} is not a quantized checkpoint (no quantization_config); load it with transformers directly")
    layout, recipe = recipe_from_config(qc)
    if (path / SIDECAR).exists():
        side = json.loads((path / SIDECAR).read_text())
        r = side["recipe"]
        recipe = Recipe(**{**r, "exclude": tuple(r["exclude"])}).with_exclude(add=side.get("excluded_modules", []))
    reader = CheckpointReader(path)
    model = _model_from_config(path, dtype, experts_implementation)
    targets = find_targets(model, recipe)
    plan = checkpoint_plan(model)
    # a module the checkpoint stores unquantized (listed in its exclude list) loads as plain weights
    stored = {t.name: all(p.key.endswith(".weight") and _is_quantized(reader, p.key[: -len(".weight")])
                          for p in plan[f"{t.name}.weight"]) for t in targets.linears}
    targets.excluded += [n for n, q in stored.items() if not q]
    targets.linears = [t for t in targets.linears if stored[t.name]]
    session = Session(model, recipe, targets)
    session.from_checkpoint = True
    params = model.state_dict(keep_vars=True)
    done = set()
    for st in session.experts:
        t = st.target
        for proj in t.projs:
            pname = f"{t.name}.{proj}"
            w_nk = t.nk(proj, params[pname].data)
            if layout == NATIVE:  # gpt-oss's own format: the fused stack as '<key>_blocks' / '<key>_scales'
                (piece,) = plan[pname]
                w_nk.copy_(native_read(reader[piece.key + "_blocks"], reader[piece.key + "_scales"], w_nk.dtype))
                st.weights_are_fake_quant = True
                done.add(pname)
                continue
            prms = [None] * t.num_experts
            units = expert_units(t, proj, plan[pname])
            for u in units:
                n = w_nk[u.expert][u.rows].shape[0]
                w, prm = _read_quantized(reader, layout, recipe, u.stem, w_nk.dtype, (n, w_nk.shape[2]))
                w_nk[u.expert][u.rows] = w
                prms[u.expert] = prm
            st.weights_are_fake_quant = True  # the parameters now hold the dequantized weights
            prm = _collapse(prms)
            if prm is not None:
                st.in_param[proj] = prm
            done.add(pname)
        st.mode = "quantize"
    for name, st in session.linears.items():
        pname = f"{name}.weight"
        pieces = plan[pname]
        prms = []
        for piece in pieces:
            n = params[pname].shape[0] if piece.rows is None else len(piece.rows)
            w, prm = _read_quantized(reader, layout, recipe, piece.key[: -len("weight")], params[pname].dtype,
                                     (n, params[pname].shape[1]))
            if piece.rows is None:
                params[pname].data.copy_(w)
            else:
                params[pname].data[piece.rows] = w
            prms.append(prm)
        st.weights_are_fake_quant = True
        st.in_param = _collapse(prms)
        st.mode = "quantize"
        done.add(pname)
    for pname, pieces in plan.items():
        if pname not in done:
            fill_from_checkpoint(params[pname].data, pieces, reader.__getitem__)
    for st in session.attention:  # kv_cache: the static k/v scales
        attn = plan[f"{st.name}.k_proj.weight"][0].key.rsplit(".", 2)[0]
        st.scale = {kind: reader[key].reshape(()).float() for kind, key in kv_cache_names(layout, attn).items()}
        st.mode = "quantize"
    session.attach(calib_all_experts=False)
    setattr(model, SESSION_ATTR, session)
    return model
