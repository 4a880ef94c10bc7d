"""What the CLI checks before (and while) it loads a model: paths, configs, weights files,
the output directory, the recipe against the model (on a meta-device copy, no weights
read), and that a quantized checkpoint is an export of the base `moeq eval` compares it
with. Every failure is a `CliError` whose message names the problem and the fix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import data as D

log = logging.getLogger("moeq")


class CliError(Exception):
    """A user error with a message that says what to do."""


def _model_path(spec: str) -> Path:
    path = D.DEMO_MODEL if spec == "demo" else Path(spec)
    if not path.exists():
        raise CliError(f"model path {path} does not exist (pass a Hugging Face checkpoint directory, or 'demo')")
    if not path.is_dir():
        raise CliError(f"--model {path} is a file; pass the checkpoint directory that holds config.json and the weights")
    if not (path / "config.json").is_file():
        raise CliError(f"{path} has no config.json; --model must be a Hugging Face checkpoint directory")
    _read_config_json(path)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise CliError(f"{path} has a config.json but no *.safetensors / *.bin weights")
    _check_safetensors_files(path)
    return path


def _read_config_json(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CliError(f"{path / 'config.json'} is not valid JSON ({e}); restore it from the original checkpoint") from e
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise CliError(f"{path / 'config.json'} has no model_type; it is not a transformers model config")
    return cfg


def _check_safetensors_files(path: Path) -> None:
    """Every weights file is complete: its header parses and the file is as long as the header
    says (a truncated download or a full disk leaves a shorter file). Reads headers only."""
    import struct

    index = path / "model.safetensors.index.json"
    files = sorted(path.glob("*.safetensors"))
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CliError(f"{index} is not a valid safetensors index ({e}); restore it from the original checkpoint") from e
        missing = sorted(n for n in names if not (path / n).is_file())
        if missing:
            raise CliError(f"{index} lists {len(missing)} weight files that are missing, e.g. {missing[0]}; "
                           f"download the complete checkpoint")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CliError(f"{f} is not a valid safetensors file ({e}); it is corrupt: download it again") from e
        if 8 + n + end != size:
            raise CliError(f"{f} is truncated or corrupt ({size} bytes, its header describes {8 + n + end}); "
                           f"download it again (a full disk or an interrupted copy leaves such files)")


def load_model(spec: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None):
    """-> (model, tokenizer, path). Clear errors for everything a user can get wrong; a
    checkpoint whose tensors do not match the config (missing, unexpected or mismatched
    keys, which transformers would fill with random values or drop) is refused."""
    import torch
    import transformers

    path = _model_path(spec)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raise CliError(f"{path}: transformers cannot read this config ({e}); moeq supports the model types of the installed transformers") from e
    if getattr(config, "quantization_config", None):
        raise CliError(f"{path} is already quantized ({config.quantization_config.get('quant_method', '?') if isinstance(config.quantization_config, dict) else 'quantized'}); pass the unquantized checkpoint")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was requested but CUDA is not available")
    kw = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    kw["device_map"] = device_map or device
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    except (RuntimeError, OSError) as e:
        if "size mismatch" in str(e) or "shape" in str(e).lower() or "safetensor" in str(e).lower():
            raise CliError(f"{path}: the checkpoint does not match its config ({str(e).splitlines()[0][:300]})") from e
        raise
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "not supported" in str(e).lower():
            raise CliError(
                f"architecture {getattr(config, 'architectures', None)} (model_type {config.model_type!r}) is not supported: "
                f"moeq quantizes causal language models that transformers loads with AutoModelForCausalLM "
                f"(MoE models with fused experts, and dense models)") from e
        raise
    problems = [(what, sorted(info.get(key) or ())) for what, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("mismatched", "mismatched_keys"))]
    problems = [(w, k) for w, k in problems if k]
    if problems:
        detail = "; ".join(f"{len(k)} {w} (e.g. {k[0]})" for w, k in problems)
        raise CliError(f"{path}: the checkpoint's tensors do not match its config: {detail}. transformers would fill "
                       f"missing weights with random values; restore the complete checkpoint")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, path


def _check_out_dir(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that would destroy data: a file, the source model,
    a folder inside it or holding it, or (without --overwrite) a non-empty directory."""
    from .checkpoint.outdir import check_out_dir

    try:
        check_out_dir(out, source, overwrite)
    except (FileExistsError, ValueError) as e:
        raise CliError(str(e)) from e


def _exclude_hint(names: list[str]) -> str:
    """--exclude patterns covering `names`, layer numbers generalized (model.layers.3.x -> model.layers.*.x)."""
    import re

    pats = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    return " ".join(f"--exclude '{p}'" for p in pats[:8]) + (f" (and {len(pats) - 8} more)" if len(pats) > 8 else "")


def _preflight(path: Path, recipe, layout: str, user_excludes: list[str], streaming: bool = False) -> None:
    """Every check that needs only the config, on a meta-device model (no weights read):
    layout vs recipe, K divisibility, --exclude patterns that match nothing."""
    from fnmatch import fnmatchcase

    from .checkpoint.layouts import UnsupportedExport, check_experts_supported, check_supported
    from .quantization import ShapeError, _check_shapes
    from .streaming import _meta_model
    from .targets import CoverageError, find_targets

    try:
        check_supported(layout, recipe)
    except ValueError as e:
        raise CliError(str(e)) from e
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raise CliError(f"{path}: transformers cannot read this config ({e}); moeq supports the model types of the "
                       f"installed transformers {transformers.__version__}") from e
    arch = (getattr(config, "architectures", None) or [""])[0]
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping and not (streaming and hasattr(transformers, arch)):
        raise CliError(f"architecture {getattr(config, 'architectures', None)} (model_type {config.model_type!r}) is not "
                       f"supported: moeq quantizes causal language models that transformers loads with "
                       f"AutoModelForCausalLM (MoE models with fused experts, and dense models)")
    try:
        model = _meta_model(path, None)
    except ValueError as e:
        raise CliError(str(e)) from e
    names = [n for n, _ in model.named_modules()]
    for pat in user_excludes:
        if not any(fnmatchcase(n, pat) for n in names):
            log.warning("--exclude %r matches no module of %s (module names look like %s)", pat, path.name,
                        next((n for n in names if n.endswith("mlp") or "experts" in n), names[-1]))
    try:
        targets = find_targets(model, recipe)
        check_experts_supported(layout, recipe, targets.experts, targets.linears)
        _check_shapes(targets, recipe)
    except ShapeError as e:
        raise CliError(f"recipe {recipe.name} {e.need}; "
                       f"these are not: {', '.join(e.modules[:4])}{' ...' if len(e.modules) > 4 else ''}. "
                       f"Leave them unquantized with {_exclude_hint(e.modules)}, or choose another --recipe") from e
    except (CoverageError, UnsupportedExport) as e:
        raise CliError(str(e)) from e


# config fields that must agree between a base model and its quantized export for `moeq eval`
# to compare like with like (the same network, the same vocabulary)
_SAME_MODEL_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "num_local_experts",
                      "n_routed_experts", "intermediate_size", "moe_intermediate_size")


def _text_cfg(cfg: dict) -> dict:
    return {**cfg, **(cfg.get("text_config") or {})}


def _check_same_model(base_path: Path, quant_path: Path, base_given: bool) -> None:
    """The quantized checkpoint must be an export of this base: same architecture, sizes and
    vocabulary. Without --model, the demo is the base only for an export of the demo."""
    qcfg = _read_config_json(quant_path)
    if "quantization_config" not in qcfg:
        raise CliError(f"--quantized {quant_path} is not a quantized checkpoint (its config.json has no quantization_config)")
    bcfg, q = _text_cfg(_read_config_json(base_path)), _text_cfg(qcfg)
    diff = [f"{k} {bcfg.get(k)!r} vs {q.get(k)!r}" for k in _SAME_MODEL_FIELDS if bcfg.get(k) != q.get(k)]
    if (bcfg.get("architectures") or [None])[0] != (q.get("architectures") or [None])[0]:
        diff.insert(0, f"architecture {bcfg.get('architectures')} vs {q.get('architectures')}")
    if diff:
        if not base_given:
            raise CliError(f"{quant_path} is not an export of the demo model ({diff[0]}); pass its unquantized "
                           f"checkpoint with --model BASE_DIR")
        raise CliError(f"--model {base_path} and --quantized {quant_path} are different models ({'; '.join(diff[:3])}); "
                       f"pass the checkpoint that {quant_path.name} was quantized from")


def _check_same_vocab(tok, quant_path: Path) -> None:
    """The quantized export carries its tokenizer: it must be the base's (same token -> id map)."""
    if not any((quant_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return
    import transformers

    try:
        qtok = transformers.AutoTokenizer.from_pretrained(quant_path)
    except (OSError, ValueError):
        return
    if qtok.get_vocab() != tok.get_vocab():
        raise CliError(f"the tokenizer of {quant_path} differs from the base model's (vocabulary of {len(qtok)} vs "
                       f"{len(tok)} tokens); evaluate it against the model it was quantized from")
