"""Tiny fused-expert MoE models for the test-suite, built from configs only (no hub access).

Everything here is derived from the *installed* transformers:

* :func:`discover_experts_classes` scans ``transformers.models.*.modeling_*`` for experts classes decorated
  with ``transformers.integrations.moe.use_experts_implementation`` and pairs each with the model class that
  instantiates it (a text-only ``*ForCausalLM`` when one exists).
* :func:`tiny_config` shrinks the real config class of a model type (2-ish decoder layers, hidden 128, every
  input dim of an ``nn.Linear`` / expert matrix a multiple of 128, 8 experts, top-2, vocab 256).
* :func:`tiny_model` instantiates it with a deterministic, non-trivial random init and the requested experts
  implementation (``eager`` / ``batched_mm`` / ``grouped_mm``).

Named shortcuts (:func:`qwen3_5_moe`, :func:`qwen3_moe`, :func:`mixtral`, :func:`deepseek_v3`,
:func:`gpt_oss`, :func:`nemotron_h`) cover the layouts the interception/export tests care about; their
model types are listed in :data:`CORE_MODELS`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import transformers
from transformers import PreTrainedModel
from transformers.integrations import moe as hf_moe

__all__ = [
    "CORE_MODELS",
    "EXPERT_IMPLEMENTATIONS",
    "FLAG_NAMES",
    "NUM_EXPERT_KEYS",
    "TOPK_KEYS",
    "ExpertsCase",
    "decorator_flags",
    "deepseek_v3",
    "discover_experts_classes",
    "experts_modules",
    "find_case",
    "forward_output",
    "gpt_oss",
    "is_experts_class",
    "linear_input_dims",
    "mixtral",
    "nemotron_h",
    "original_forward",
    "qwen3_5_moe",
    "qwen3_moe",
    "random_input_ids",
    "single_thread",
    "tiny_config",
    "tiny_model",
]

#: The experts implementations every decorated class supports on CPU.
EXPERT_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")

#: Model types (or family aliases accepted by :func:`tiny_config`) used by the interception / export tests.
#: ``nemotron_h`` is the ``has_gate=False`` representative (``up_proj`` instead of ``gate_up_proj``).
CORE_MODELS = ["qwen3_5_moe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "nemotron_h"]

HIDDEN = 128
INTERMEDIATE = 256  # dense MLP intermediate size
MOE_INTERMEDIATE = 128  # routed / shared expert intermediate size
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 64
NUM_EXPERTS = 8
TOP_K = 2
VOCAB = 256
MAX_POSITIONS = 512
INIT_STD = 0.02

#: Flags of ``use_experts_implementation`` (read back from the decorator's ``__init__`` closure).
FLAG_NAMES = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


# --------------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def _decorator_markers() -> tuple[Any, Any]:
    """Code objects of the ``__init__`` / ``forward`` wrappers installed by ``use_experts_implementation``.

    Obtained by decorating a throw-away class, so the check does not depend on private names: every decorated
    class (and every subclass that inherits a decorated ``forward``) runs exactly these code objects.
    """

    class _Probe(nn.Module):
        def __init__(self, config):
            super().__init__()

        def forward(self, x):  # pragma: no cover - never called
            return x

    probe = hf_moe.use_experts_implementation(_Probe)
    return probe.__init__.__code__, probe.forward.__code__


def is_experts_class(cls: Any) -> bool:
    """True if ``cls`` is an ``nn.Module`` class whose ``forward`` is the ``use_experts_implementation`` dispatcher."""
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        return False
    return getattr(cls.forward, "__code__", None) is _decorator_markers()[1]


def _closure_vars(fn: Callable) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return {}
    out = {}
    for name, cell in zip(code.co_freevars, fn.__closure__):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # empty cell
            pass
    return out


def decorator_flags(cls: type) -> dict[str, bool]:
    """The flags passed to ``use_experts_implementation`` for ``cls`` (read from the wrapper closures)."""
    init = cls.__init__
    # Walk up the MRO until we hit the decorator's __init__ wrapper (a subclass may override __init__).
    for klass in cls.__mro__:
        fn = klass.__dict__.get("__init__")
        if getattr(fn, "__code__", None) is _decorator_markers()[0]:
            init = fn
            break
    cv = _closure_vars(init)
    return {k: bool(cv[k]) for k in FLAG_NAMES if k in cv}


def original_forward(cls: type) -> Callable:
    """The class's own (eager) forward, i.e. what the decorator dispatches to for ``"eager"``."""
    cv = _closure_vars(cls.forward)
    return cv.get("original_forward", getattr(cls.forward, "__wrapped__", cls.forward))


@dataclasses.dataclass
class ExpertsCase:
    """One decorated experts class and how to build a tiny model that contains it."""

    model_type: str  #: model_type of the config class :func:`tiny_config` builds
    family: str  #: the ``transformers.models.<family>`` package defining the experts class
    experts_class: type
    model_class: type | None  #: class :func:`tiny_model` instantiates (text-only when possible)
    top_level_class: type | None  #: the causal-LM / conditional-generation class of the family
    flags: dict[str, bool]
    custom_apply_gate: bool  #: the class defines its own ``_apply_gate``
    variant: str  #: hash of eager forward + ``_apply_gate`` source + flags (equal for modular copies)
    skip_reason: str | None = None
    aliases: tuple[str, ...] = ()  #: other model types / family names resolving to this case

    @property
    def experts_class_name(self) -> str:
        return self.experts_class.__name__

    @property
    def model_class_name(self) -> str | None:
        return None if self.model_class is None else self.model_class.__name__

    @property
    def config_class(self) -> type | None:
        return None if self.model_class is None else self.model_class.config_class

    def __repr__(self) -> str:  # short, for pytest ids / logs
        skip = f", skip={self.skip_reason!r}" if self.skip_reason else ""
        return f"ExpertsCase({self.model_type}: {self.experts_class_name} in {self.model_class_name}{skip})"


def _modeling_module_names() -> list[str]:
    """``transformers.models.<pkg>.modeling_*`` modules that mention an experts class (cheap text pre-filter)."""
    root = os.path.dirname(transformers.models.__file__)
    names = []
    for pkg in sorted(os.listdir(root)):
        pkg_dir = os.path.join(root, pkg)
        if not os.path.isdir(pkg_dir):
            continue
        for fname in sorted(os.listdir(pkg_dir)):
            if not (fname.startswith("modeling_") and fname.endswith(".py")):
                continue
            try:
                with open(os.path.join(pkg_dir, fname), encoding="utf-8") as fh:
                    src = fh.read()
            except OSError:
                continue
            if "use_experts_implementation" in src or re.search(r"Experts\b", src):
                names.append(f"transformers.models.{pkg}.{fname[:-3]}")
    return names


def _source(fn: Any) -> str:
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return repr(fn)


def _auto_class_names(mapping_name: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, mapping_name, {}) or {}
    out = set()
    for v in mapping.values():
        out.update(v if isinstance(v, (list, tuple)) else [v])
    return out


def _is_text_only_config(config_class: type | None) -> bool:
    if config_class is None:
        return False
    sub = getattr(config_class, "sub_configs", None) or {}
    return not sub


_NON_TEXT = re.compile(r"Vision|Audio|Image|Video|Encoder(?!Text)|Sam|Code2Wav|CodePredictor|Wav")


def _pick_model_class(
    experts_cls: type, module, n_experts_in_module: int
) -> tuple[type | None, type | None, str | None]:
    """Return ``(model_class, top_level_class, skip_reason)`` for an experts class defined in ``module``."""
    classes = [
        v
        for v in vars(module).values()
        if inspect.isclass(v)
        and issubclass(v, PreTrainedModel)
        and v.__module__ == module.__name__
        and not v.__name__.endswith("PreTrainedModel")
        and getattr(v, "config_class", None) is not None
    ]
    causal = _auto_class_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    img2txt = _auto_class_names("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES") | _auto_class_names(
        "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"
    )
    tokcls = _auto_class_names("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES")

    prefix = experts_cls.__name__[: -len("Experts")] if experts_cls.__name__.endswith("Experts") else ""

    def matches_prefix(c: type) -> bool:
        if n_experts_in_module <= 1 or not prefix:
            return True
        return c.__name__.startswith(prefix) or c.config_class.__name__.startswith(prefix)

    # The class a checkpoint of this family loads as: the multimodal wrapper when there is one, else the causal LM.
    short = prefix.replace("Text", "")
    multimodal = [
        c
        for c in classes
        if (c.__name__.endswith("ForConditionalGeneration") or c.__name__ in img2txt)
        and "PreTrainedModel" not in c.__name__
        and not _NON_TEXT.search(c.__name__)
        and (n_experts_in_module <= 1 or c.__name__.startswith(short))
    ]
    multimodal.sort(key=lambda c: (c.__name__ not in img2txt, c.__name__))
    top_level = multimodal[0] if multimodal else None

    def rank(c: type) -> tuple | None:
        name = c.__name__
        if _NON_TEXT.search(name) or not matches_prefix(c):
            return None
        text_only = _is_text_only_config(c.config_class)
        if not text_only:
            return None
        if name.endswith("ForCausalLM"):
            return (0, name)
        if name in causal:
            return (1, name)
        if name.endswith("TextModel") or (name.endswith("Model") and c.config_class.model_type.endswith("_text")):
            return (2, name)
        if name in tokcls or name.endswith("ForTokenClassification"):
            return (3, name)
        if name.endswith("Model"):
            return (4, name)
        return None

    ranked = sorted((r, c) for c in classes if (r := rank(c)) is not None)
    if ranked:
        return ranked[0][1], top_level or ranked[0][1], None
    return None, top_level, "multimodal only: no text-only class (top-level needs pixel/audio inputs)"


#: Cases that discovery finds but that cannot be built tiny / run on random ids; the value is the reason.
_KNOWN_SKIPS: dict[str, str] = {}


@functools.cache
def _discover() -> tuple[ExpertsCase, ...]:
    seen: set[type] = set()
    per_module: dict[str, list[type]] = {}
    for modname in _modeling_module_names():
        try:
            module = importlib.import_module(modname)
        except Exception:  # optional dependency missing, etc.
            continue
        for obj in list(vars(module).values()):
            # Only register a class where it is defined: imports / re-exports are the same object (dedupe).
            if is_experts_class(obj) and obj.__module__ == modname and obj not in seen:
                per_module.setdefault(modname, []).append(obj)
                seen.add(obj)

    cases = []
    for modname, classes in per_module.items():
        module = sys.modules[modname]
        family = modname.split(".")[2]
        for cls in classes:
            model_cls, top_cls, skip = _pick_model_class(cls, module, len(classes))
            flags = decorator_flags(cls)
            apply_gate = getattr(cls, "_apply_gate", None)
            custom_gate = apply_gate is not None and apply_gate is not hf_moe._default_apply_gate
            blob = _source(original_forward(cls)) + (_source(apply_gate) if custom_gate else "")
            blob += repr(sorted(flags.items()))
            variant = hashlib.sha1(blob.encode()).hexdigest()[:12]
            model_type = (model_cls.config_class.model_type if model_cls is not None else "") or (
                top_cls.config_class.model_type if top_cls is not None else ""
            ) or family
            skip = skip or _KNOWN_SKIPS.get(model_type)
            cases.append(
                ExpertsCase(
                    model_type=model_type,
                    family=family,
                    experts_class=cls,
                    model_class=model_cls,
                    top_level_class=top_cls,
                    flags=flags,
                    custom_apply_gate=custom_gate,
                    variant=variant,
                    skip_reason=skip,
                )
            )
    # Aliases: the family name (e.g. "qwen3_5_moe" -> the "qwen3_5_moe_text" case) when unambiguous.
    by_family: dict[str, list[ExpertsCase]] = {}
    for c in cases:
        by_family.setdefault(c.family, []).append(c)
    for fam, cs in by_family.items():
        if len(cs) == 1 and cs[0].model_type != fam:
            cs[0].aliases = (fam,)
        elif len(cs) > 1:
            # e.g. qwen3_omni_moe: thinker + talker; the family name resolves to the main (shortest) model type.
            first = min(cs, key=lambda c: (c.skip_reason is not None, len(c.model_type), c.model_type))
            if first.model_type != fam:
                first.aliases = (fam,)
    return tuple(sorted(cases, key=lambda c: (c.family, c.model_type, c.experts_class_name)))


def discover_experts_classes() -> list[ExpertsCase]:
    """All experts classes decorated with ``use_experts_implementation`` in the installed transformers.

    Scans ``transformers.models.*.modeling_*`` (modules whose text mentions ``Experts``), recognises decorated
    classes structurally (their ``forward`` *is* the decorator's dispatch wrapper), dedupes re-exported copies
    (a class is registered only in the module that defines it) and pairs each with the text-only model class
    that contains it. Records that cannot be built on token ids alone carry a ``skip_reason``.
    """
    return list(_discover())


def find_case(model_type: str) -> ExpertsCase:
    """Resolve a model type (``"qwen3_5_moe_text"``), family alias (``"qwen3_5_moe"``) or experts class name."""
    cases = _discover()
    for c in cases:
        if c.model_type == model_type:
            return c
    for c in cases:
        if model_type in c.aliases or model_type == c.experts_class_name:
            return c
    raise KeyError(f"no decorated experts class found for model type {model_type!r}")


# --------------------------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------------------------

#: Generic field values applied when the field exists in the config class.
_GENERIC: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    "tie_word_embeddings": False,
    "num_attention_heads": NUM_HEADS,
    "head_dim": HEAD_DIM,
    # MLA (DeepSeek-V2/V3 family)
    "kv_lora_rank": 128,
    "q_lora_rank": 128,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 32,
    "qk_head_dim": 64,
    "v_head_dim": 64,
    # sparse-attention indexers (DSA)
    "index_n_heads": 2,
    "index_head_dim": 64,
    "index_topk": 8,
    # routing
    "n_group": 1,
    "num_expert_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    # linear attention (Qwen3-Next / Qwen3.5 gated delta-net)
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    # linear attention (Kimi-Linear / GLM-5-Next KDA): head_dim is also a low-rank bottleneck width
    "linear_num_heads": 2,
    "linear_head_dim": 128,
    # mamba-2 mixers
    "mamba_num_heads": 4,
    "mamba_head_dim": 64,
    "mamba_n_heads": 4,
    "mamba_d_head": 64,
    "mamba_d_state": 16,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 16,
    "ssm_state_size": 16,
    "n_groups": 1,
    "chunk_size": 16,
    "mamba_expand": 2,
    "mamba_dt_rank": 128,
    "expand": 2,
    "sliding_window": 64,
    "attention_chunk_size": 64,
}

NUM_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOPK_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_k",
    "top_k",
    "top_k_experts",
    "num_selected_experts",
)
_DENSE_PREFIX_KEYS = ("first_k_dense_replace", "num_dense_layers", "first_dense_layers", "moe_layer_start_index")


def _family_overrides(family: str, model_type: str, defaults: dict, kw: dict) -> None:
    """Model-specific fixes on top of the generic shrink (mutates ``kw``)."""
    hook = _FAMILY_HOOKS.get(model_type) or _FAMILY_HOOKS.get(family)
    if hook is not None:
        hook(defaults, kw)


def _hook_gpt_oss(d: dict, kw: dict) -> None:
    kw["sliding_window"] = 8  # make the sliding layers actually slide on short test sequences


def _hook_nemotron_h(d: dict, kw: dict) -> None:
    # mamba mixer -> MoE -> attention: the hybrid structure with one MoE block.
    kw["layers_block_type"] = ["linear_attention", "moe", "full_attention"]
    kw.pop("num_hidden_layers", None)
    kw["moe_shared_expert_intermediate_size"] = MOE_INTERMEDIATE
    kw["moe_latent_size"] = None


def _hook_gemma4(d: dict, kw: dict) -> None:
    kw["enable_moe_block"] = True  # the default Gemma4 text config is dense
    kw["hidden_size_per_layer_input"] = HIDDEN


def _hook_ernie4_5_vl(d: dict, kw: dict) -> None:
    # the modeling code defaults mrope_section to [22, 22, 20] (head_dim 128); rescale to the tiny head_dim
    half = (kw.get("head_dim") or HIDDEN // NUM_HEADS) // 2
    hw = half * 22 // 64
    kw["rope_parameters"] = dict(d.get("rope_parameters") or {}, mrope_section=[hw, hw, half - 2 * hw])


def _hook_qwen3_omni_talker(d: dict, kw: dict) -> None:
    kw["shared_expert_intermediate_size"] = MOE_INTERMEDIATE  # read by the talker MoE block, not a config field


def _hook_qwen4_exp(d: dict, kw: dict) -> None:
    # "indexed_attention" layers need the QSA indexer fields (all None by default)
    kw.update(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=HEAD_DIM, indexer_budget=8, indexer_compress_ratio=4
    )


def _hook_zaya(d: dict, kw: dict) -> None:
    kw["num_experts_per_tok"] = 1  # ZAYA only supports top-1 routing


def _hook_lfm2_moe(d: dict, kw: dict) -> None:
    kw["layer_types"] = ["conv", "full_attention"]  # None by default but required by the modeling code
    kw["num_dense_layers"] = 1


def _hook_glm4v_moe(d: dict, kw: dict) -> None:
    # modeling default mrope_section [8, 12, 12] assumes head_dim 128; tiny head_dim = 128 / 4 heads = 32, half rotary
    kw["rope_parameters"] = dict(d.get("rope_parameters") or {}, mrope_section=[2, 3, 3])


def _hook_dots3_note(d: dict, kw: dict) -> None:
    kw["head_dim"] = kw["qk_nope_head_dim"] + kw["qk_rope_head_dim"]  # required for the sliding-window MLA layers


def _hook_glm5_next(d: dict, kw: dict) -> None:
    kw["index_kpool"] = 4  # index_topk must be divisible by index_kpool


def _hook_jamba(d: dict, kw: dict) -> None:
    # layer 0 mamba, layer 1 attention (default period 8 / offset 4 would leave 2 mamba layers); both MoE
    kw.update(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0)


def _hook_granitemoehybrid(d: dict, kw: dict) -> None:
    kw["layer_types"] = ["linear_attention", "full_attention"]  # mamba + attention (default: all mamba)


def _hook_deepseek_v4(d: dict, kw: dict) -> None:
    kw["o_groups"] = 2  # o_a_proj input = heads * head_dim / o_groups = 128
    kw["o_lora_rank"] = HIDDEN


_FAMILY_HOOKS: dict[str, Callable[[dict, dict], None]] = {
    "gpt_oss": _hook_gpt_oss,
    "nemotron_h": _hook_nemotron_h,
    "gemma4_text": _hook_gemma4,
    "ernie4_5_vl_moe_text": _hook_ernie4_5_vl,
    "qwen3_omni_moe_talker_text": _hook_qwen3_omni_talker,
    "qwen4_exp_text": _hook_qwen4_exp,
    "zaya": _hook_zaya,
    "lfm2_moe": _hook_lfm2_moe,
    "deepseek_v4": _hook_deepseek_v4,
    "glm4v_moe_text": _hook_glm4v_moe,
    "dots3_note_text": _hook_dots3_note,
    "glm5_next_text": _hook_glm5_next,
    "jamba": _hook_jamba,
    "granitemoehybrid": _hook_granitemoehybrid,
}


def _per_layer_lists(defaults: dict, n_layers: int | None) -> dict[str, list]:
    if not n_layers:
        return {}
    return {
        k: v
        for k, v in defaults.items()
        if isinstance(v, list) and len(v) == n_layers and n_layers > 1 and all(isinstance(x, str) for x in v)
    }


def _choose_layers(lists: dict[str, list], n_layers: int) -> list[int]:
    """Pick a small set of layer indices covering every distinct value of every per-layer list.

    Greedy set cover over (list, value) pairs; ties broken by layer order. Ensures a sparse/MoE layer is kept.
    """
    if not lists:
        return [0, 1]
    uncovered = {(k, v) for k, lst in lists.items() for v in lst}
    chosen: list[int] = []
    while uncovered:
        best, gain = None, 0
        for i in range(n_layers):
            g = sum((k, lists[k][i]) in uncovered for k in lists)
            if g > gain:
                best, gain = i, g
        chosen.append(best)
        uncovered -= {(k, lists[k][best]) for k in lists}
    if len(chosen) == 1:  # homogeneous: still build 2 layers
        chosen.append(chosen[0] + 1 if chosen[0] + 1 < n_layers else chosen[0] - 1)
    return sorted(chosen)


def _is_num(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Keys set even when the default is ``None`` (they are required for an MoE layer to exist).
_FILL_NONE = set(NUM_EXPERT_KEYS + TOPK_KEYS) | {"n_group", "topk_group", "head_dim", "n_shared_experts"}


def _shrink_kwargs(config_class: type, family: str, model_type: str) -> dict[str, Any]:
    defaults = config_class().to_dict()
    kw: dict[str, Any] = {}
    for k, v in _GENERIC.items():
        # Set only fields the config has; keep disabled features (None / 0, e.g. no q-LoRA, no RoPE) disabled.
        if k in defaults and (defaults[k] or k in _FILL_NONE):
            kw[k] = v
    for k, v in defaults.items():
        if "intermediate_size" in k and isinstance(v, list) and all(_is_num(x) for x in v):
            kw[k] = [MOE_INTERMEDIATE] * len(v)  # e.g. Ernie-4.5-VL: [text experts, vision experts]
        if not (_is_num(v) or v is None) or k in kw:
            continue
        if "intermediate_size" in k:
            dense = k in ("intermediate_size", "dense_intermediate_size", "ffn_hidden_size")
            if v is not None or not dense:
                kw[k] = INTERMEDIATE if dense else MOE_INTERMEDIATE
        elif v is None:
            continue
        elif k.endswith("hidden_size") and v > HIDDEN:
            kw[k] = HIDDEN
        elif (k.endswith("vocab_size") or k.startswith("vocab_size")) and v > VOCAB:
            kw[k] = VOCAB
        elif k.endswith("rank") and v > 0:
            kw[k] = 128  # low-rank bottlenecks feed an nn.Linear input
        elif k.endswith("_token_id") and v >= VOCAB:
            kw[k] = VOCAB - 1 - sorted(defaults).index(k) % 16  # deterministic, inside the tiny vocabulary
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        v = defaults.get(k)
        if isinstance(v, list):
            kw[k] = [x if x < VOCAB else VOCAB - 1 - i for i, x in enumerate(v)]
    # Keep DeepSeek's "head_dim == qk_rope_head_dim" / "qk_head_dim == nope + rope" relations.
    if defaults.get("head_dim") and defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
        kw["head_dim"] = kw["qk_rope_head_dim"]
    if "qk_head_dim" in defaults and "qk_nope_head_dim" in kw:
        kw["qk_head_dim"] = kw["qk_nope_head_dim"] + kw.get("qk_rope_head_dim", defaults.get("qk_rope_head_dim") or 0)
    # Preserve the attention layout: MHA stays MHA (MLA models need it), MQA stays MQA, GQA -> 4 q / 2 kv heads.
    for k in [k for k in defaults if k.endswith("num_key_value_heads")]:
        q = defaults.get(k.replace("num_key_value_heads", "num_attention_heads"))
        kv = defaults[k]
        kw[k] = NUM_HEADS if kv is None or kv == q else (1 if kv == 1 else NUM_KV_HEADS)
    for k, v in defaults.items():
        if k in kw or not _is_num(v):
            continue
        if k.endswith("num_attention_heads"):
            kw[k] = NUM_HEADS
        elif k.endswith("head_dim") and v > HEAD_DIM:
            kw[k] = HEAD_DIM
    rope = defaults.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
        kw["rope_parameters"] = dict(rope, mrope_section=_scale_sections(rope["mrope_section"], defaults, kw))
    for k in NUM_EXPERT_KEYS:
        if k in defaults:
            kw[k] = NUM_EXPERTS
    for k in TOPK_KEYS:
        if k in defaults:
            kw[k] = TOP_K

    n_default = defaults.get("num_hidden_layers")
    lists = _per_layer_lists(defaults, n_default)
    if lists:
        idx = _choose_layers(lists, n_default)
        for k, lst in lists.items():
            kw[k] = [lst[i] for i in idx]
        kw["num_hidden_layers"] = len(idx)
        mlp = next((kw[k] for k in lists if "mlp" in k), None)
        for k in _DENSE_PREFIX_KEYS:
            if k in defaults and _is_num(defaults[k]):
                kw[k] = 0 if mlp is None else next((i for i, t in enumerate(mlp) if t != "dense"), len(mlp))
        plc = defaults.get("per_layer_config")
        if isinstance(plc, dict):
            kw["per_layer_config"] = _remap_per_layer_config(plc, idx, defaults, kw)
    elif "num_hidden_layers" in defaults:
        kw["num_hidden_layers"] = 2
        for k in _DENSE_PREFIX_KEYS:
            if k in defaults and _is_num(defaults[k]) and defaults[k] > 0:
                kw[k] = 1  # layer 0 dense, layer 1 MoE
        if "mlp_layer_types" in defaults and defaults["mlp_layer_types"] is None:
            kw["mlp_layer_types"] = ["dense", "sparse"]
    if "mlp_only_layers" in defaults:
        kw["mlp_only_layers"] = []
    if "decoder_sparse_step" in defaults:
        kw["decoder_sparse_step"] = 1
    if "max_window_layers" in defaults:
        kw["max_window_layers"] = kw.get("num_hidden_layers", 2)
    _family_overrides(family, model_type, defaults, kw)
    return kw


def _rotary_base(cfg: dict) -> int:
    if cfg.get("qk_rope_head_dim"):
        return cfg["qk_rope_head_dim"]
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _scale_sections(sections: list[int], defaults: dict, kw: dict) -> list[int]:
    """Rescale an M-RoPE ``mrope_section`` (sums to rotary_dim / 2) to the shrunken head / rope dim."""
    new_cfg = {**defaults, **kw}
    if "head_dim" in defaults and defaults["head_dim"] is None:
        new_cfg["head_dim"] = None
    total = sum(sections) * _rotary_base(new_cfg) // _rotary_base(defaults)
    out = [max(1, s * total // sum(sections)) for s in sections]
    out[0] += total - sum(out)
    return out


def _remap_per_layer_config(plc: dict, idx: list[int], defaults: dict, kw: dict) -> dict:
    """Re-key a ``{"05": {...}}`` per-layer override dict onto the kept layers, shrinking head dims."""
    width = max(len(k) for k in plc) if plc else 2
    out = {}
    for new_i, old_i in enumerate(idx):
        entry = plc.get(f"{old_i:0{width}d}") or plc.get(str(old_i))
        if entry is None:
            continue
        entry = dict(entry)
        for key, val in entry.items():
            if key == "head_dim" and defaults.get("head_dim") and _is_num(val):
                entry[key] = HEAD_DIM * val // defaults["head_dim"]  # keep e.g. Gemma's 2x wider global heads
            elif key in kw and _is_num(val):
                entry[key] = kw[key]
        out[f"{new_i:0{width}d}"] = entry
    return out


@functools.cache
def _tiny_config_cached(model_type: str, overrides: tuple) -> Any:
    case = find_case(model_type)
    if case.config_class is None:
        raise ValueError(f"{model_type}: {case.skip_reason}")
    kw = _shrink_kwargs(case.config_class, case.family, case.model_type)
    kw.update(dict(overrides))
    return case.config_class(**kw)


def tiny_config(model_type: str, **overrides) -> Any:
    """A shrunken instance of ``model_type``'s real config class (a fresh copy; built once per model type).

    2 decoder layers (or the fewest layers covering each layer/MLP type of hybrid models, e.g. one linear- and one
    full-attention layer for Qwen3.5 / Qwen3-Next, dense + MoE for DeepSeek), hidden 128, dense intermediate 256,
    expert/shared-expert intermediate 128, 4 heads x 64 (2 KV heads), 8 experts, top-2, vocab 256, 512 positions,
    untied embeddings. ``overrides`` are passed to the config constructor last.
    """
    cfg = _tiny_config_cached(model_type, tuple(sorted(overrides.items(), key=lambda kv: kv[0])))
    return copy.deepcopy(cfg)


# --------------------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------------------


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every decorated experts module in ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_experts_class(type(m))]


def _expert_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False)]


@torch.no_grad()
def _reinit(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)

    def normal_(p: torch.Tensor, std: float = INIT_STD) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))

    expert_param_ids = set()
    for _, mod in experts_modules(model):
        for _, p in _expert_params(mod):
            expert_param_ids.add(id(p))
            if not p.is_floating_point():
                continue
            # 3-D weights and 2-D biases [E, out]: always re-drawn (several _init_weights leave them empty / zero).
            normal_(p)
    for name, p in model.named_parameters():
        if id(p) in expert_param_ids or not p.is_floating_point():
            continue
        bad = not torch.isfinite(p).all() or (p.numel() > 0 and p.abs().max() > 1e4)
        if p.ndim >= 2 and (bad or not p.any()):
            normal_(p)
        elif p.ndim == 1 and bad:
            p.zero_()


def _set_experts_implementation(model: PreTrainedModel, implementation: str) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(implementation)
    # Belt and braces: the dispatcher reads ``self.config._experts_implementation`` of each experts module.
    for _, mod in experts_modules(model):
        if mod.config._experts_implementation != implementation:
            mod.config._experts_implementation_internal = implementation


def tiny_model(
    model_type: str,
    experts_implementation: str = "grouped_mm",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> PreTrainedModel:
    """Instantiate the tiny model of ``model_type`` in eval mode.

    Deterministic: ``torch.manual_seed(seed)`` before construction, then every expert parameter (3-D weights and
    their biases) is re-drawn from N(0, 0.02) with a generator seeded from ``seed`` (several ``_init_weights``
    leave experts as ``torch.empty`` / zeros), and any all-zero or non-finite >=2-D weight elsewhere too.
    """
    case = find_case(model_type)
    if case.model_class is None:
        raise ValueError(f"{model_type}: {case.skip_reason}")
    config = tiny_config(model_type, **config_overrides)
    config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = case.model_class(config)
    _reinit(model, seed)
    model.to(dtype)
    _set_experts_implementation(model, experts_implementation)
    model.eval()
    return model


@contextlib.contextmanager
def single_thread():
    """Run torch intra-op work on one thread (restored on exit).

    Tiny models are far too small to benefit from intra-op parallelism, and on a busy shared 2-core machine the
    OpenMP thread pool makes them 10-40x slower (threads spin-wait for descheduled peers).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def random_input_ids(model_or_config: Any, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """Deterministic random token ids valid for the model's vocabulary."""
    config = getattr(model_or_config, "config", model_or_config)
    vocab = getattr(config, "vocab_size", VOCAB) or VOCAB
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def forward_output(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Run a forward pass and return logits (causal LM / token classification) or the last hidden state."""
    kwargs: dict[str, Any] = {"use_cache": False} if _accepts(model, "use_cache") else {}
    with torch.no_grad():
        try:
            out = model(input_ids=input_ids, **kwargs)
        except AttributeError as err:
            # e.g. Qwen3OmniMoeTalkerModel: forward(input_ids=...) reads a missing ``embed_tokens`` (its embedding is
            # ``codec_embedding``; the talker is always fed ``inputs_embeds``) -> embed the ids ourselves.
            if "embed_tokens" not in str(err):
                raise
            out = model(inputs_embeds=model.get_input_embeddings()(input_ids), **kwargs)
    for attr in ("logits", "last_hidden_state"):
        val = getattr(out, attr, None)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out)}")


def _accepts(model: nn.Module, arg: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def linear_input_dims(model: nn.Module) -> dict[str, int]:
    """Input dims of every ``nn.Linear`` and every 3-D expert matrix (for the multiple-of-128 check)."""
    dims: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            dims[name] = mod.in_features
        elif is_experts_class(type(mod)):
            transposed = getattr(mod, "is_transposed", False)
            for pname, p in _expert_params(mod):
                if p.ndim == 3:
                    dims[f"{name}.{pname}"] = p.shape[1] if transposed else p.shape[2]
    return dims


# --------------------------------------------------------------------------------------------------------------
# Named shortcuts
# --------------------------------------------------------------------------------------------------------------


def qwen3_5_moe(**kw) -> PreTrainedModel:
    """Text-only ``Qwen3_5MoeForCausalLM`` (``Qwen3_5MoeTextConfig``): one linear- + one full-attention layer."""
    return tiny_model("qwen3_5_moe", **kw)


def qwen3_moe(**kw) -> PreTrainedModel:
    """``Qwen3MoeForCausalLM``: standard ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``."""
    return tiny_model("qwen3_moe", **kw)


def mixtral(**kw) -> PreTrainedModel:
    """``MixtralForCausalLM``."""
    return tiny_model("mixtral", **kw)


def deepseek_v3(**kw) -> PreTrainedModel:
    """``DeepseekV3ForCausalLM``: MLA, layer 0 dense, layer 1 MoE with a shared expert."""
    return tiny_model("deepseek_v3", **kw)


def gpt_oss(**kw) -> PreTrainedModel:
    """``GptOssForCausalLM``: transposed ``[E, H, 2I]`` interleaved gate/up with biases."""
    return tiny_model("gpt_oss", **kw)


def nemotron_h(**kw) -> PreTrainedModel:
    """``NemotronHForCausalLM``: the ``has_gate=False`` layout (``up_proj [E, I, H]``); mamba + MoE + attention."""
    return tiny_model("nemotron_h", **kw)
