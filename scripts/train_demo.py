#!/usr/bin/env python
"""Train the tiny Qwen3.5-MoE demo model that ships with ``moeq`` (``moeq/demo/``).

The demo model is a small but architecturally faithful ``Qwen3_5MoeForCausalLM``:
hybrid gated-delta-net linear attention + gated full attention layers, a sparse
MoE block with fused (3-D) routed experts plus a sigmoid-gated shared expert in
every layer.  It is trained from scratch on the CPython standard library so
that quantization quality can be measured (perplexity) without a model hub.

Every nn.Linear / expert weight that a quantizer would touch has an input
dimension K divisible by 128 (NVFP4 block 16, INT4 group 128); only the router
(``mlp.gate``), ``shared_expert_gate`` and the tiny gated-delta-net ``in_proj_a`` /
``in_proj_b`` projections have small *output* dims (their K is still hidden_size).

How to run (from the repository root, CPU only, one thread)::

    . .venv/bin/activate
    python scripts/train_demo.py            # full run (400 steps, ~12 min on a contended core), writes moeq/demo/
    python scripts/train_demo.py --quick    # ~1 min smoke run, writes /tmp/moeq_demo_quick/
    python scripts/train_demo.py --arch qwen3_moe --out-dir /work/model2   # second model, see below

What it produces in the output directory (default ``moeq/demo``):

* ``calib.txt`` / ``eval.txt``  held-out stdlib sources (calibration / evaluation
  split, disjoint from training and from each other), each file preceded by a
  ``# ---- file: NAME ----`` line.  They ship with the package so evaluation
  reproduces on any Python version.
* ``LICENSE-DATA.txt``          PSF license notice for the data.
* ``model/``                    HF checkpoint (bfloat16 safetensors, config.json,
  generation_config.json, tokenizer.json, tokenizer_config.json).
* ``metrics.json``              ``{"eval_ppl", "unigram_ppl", "eval_tokens", "window"}``.
* ``TRAINING.md``               the figures, command, timing and config summary.

Data: the top-level ``*.py`` files of the running interpreter's stdlib plus a
fixed allow-list of packages (tests excluded).  Files are sorted by relative
path; among the top-level files (after a few exclusions) index ``i % 20 == 4``
goes to calibration and ``i % 20 == 9`` to evaluation, everything else trains.
The tokenizer (byte-level BPE, vocab 4096) is trained on the train split only.

Held-out files are written once: later runs reuse an existing ``calib.txt`` /
``eval.txt`` in the output directory (and exclude the files they name from
training) unless ``--resplit`` is given.

Determinism: fixed seeds, a fixed number of optimizer steps (``--steps``) with
a cosine schedule and single-threaded torch.  ``--time-budget`` is only a safety
cap: if it is hit, training stops early and TRAINING.md says so.  Exact figures
depend on the Python version whose stdlib supplies the *training* data, and
on the torch build (bf16 autocast kernels).

Second model (``--arch qwen3_moe``): a plain ``Qwen3MoeForCausalLM`` of about the
same size (standard GQA attention with q/k norms, plain ``x * w`` RMSNorm, 16 routed
experts top-4, no shared expert), used to cross-check quantization results on an
architecture other than the demo's.  It reuses the demo's held-out split and its
tokenizer (``--data-from``, default ``moeq/demo`` for this arch: ``calib.txt``,
``eval.txt`` and ``LICENSE-DATA.txt`` are copied into ``--out-dir``, the tokenizer
files are copied byte-for-byte from ``moeq/demo/model``), so the demo's calibration
and evaluation texts tokenize identically for both models.  It never writes into
``moeq/demo``: ``--out-dir`` defaults to ``/tmp/moeq_qwen3_moe``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "moeq" / "demo"
QUICK_OUT = Path("/tmp/moeq_demo_quick")
QWEN3_MOE_OUT = Path("/tmp/moeq_qwen3_moe")

SEPARATOR = "# ---- file: {name} ----\n"
EOS_TOKEN = "<|endoftext|>"

# Packages (directories under the stdlib) whose sources are used for training only.
TRAIN_PACKAGES = (
    "asyncio", "collections", "concurrent", "ctypes", "curses", "dbm", "email", "html",
    "http", "importlib", "json", "logging", "multiprocessing", "re", "sqlite3", "tomllib",
    "unittest", "urllib", "venv", "wsgiref", "xml", "xmlrpc", "zoneinfo",
)
# Directory names skipped anywhere inside those packages.
SKIP_DIRS = {"test", "tests", "__pycache__", "idle_test", "site-packages"}
# Top-level files that are not useful source text.
SKIP_FILE_PREFIXES = ("_sysconfigdata", "this.py", "__phello__")
HOLDOUT_PERIOD = 20
CALIB_RESIDUE = 4
EVAL_RESIDUE = 9

MODEL_CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    # gated full attention: q_proj 256 -> 4*64*2, o_proj K = 4*64 = 256
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    # gated delta net: value_dim = 4*64 = 256 (out_proj K), key_dim = 2*64
    linear_num_key_heads=2,
    linear_key_head_dim=64,
    linear_num_value_heads=4,
    linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    # MoE: 16 routed experts, top-4, expert down_proj K = 128; shared expert K = 256
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=256,
    router_aux_loss_coef=0.01,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
)

# Second model: plain Qwen3-MoE with about the demo's parameter budget.  Every quantizable
# weight has K = 256 (hidden; o_proj K = 4*64) or 128 (expert down_proj).
_SHARED_WITH_DEMO = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "router_aux_loss_coef",
                     "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "initializer_range")
QWEN3_MOE_CONFIG = {k: MODEL_CONFIG[k] for k in _SHARED_WITH_DEMO} | dict(
    norm_topk_prob=True,
    intermediate_size=512,  # dense MLP size, unused: every layer is MoE (decoder_sparse_step 1)
)


# --------------------------------------------------------------------------- data


def collect_sources(stdlib: Path | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return (top_level, packages): sorted lists of (relative posix path, text)."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    top = []
    for path in sorted(stdlib.glob("*.py"), key=lambda p: p.name):
        if path.name.startswith(SKIP_FILE_PREFIXES):
            continue
        top.append((path.name, path.read_text(encoding="utf-8")))
    pkgs = []
    for pkg in TRAIN_PACKAGES:
        root = stdlib / pkg
        if not root.is_dir():
            continue
        for path in root.rglob("*.py"):
            rel = path.relative_to(stdlib)
            if SKIP_DIRS.intersection(rel.parts[:-1]):
                continue
            pkgs.append((rel.as_posix(), path.read_text(encoding="utf-8")))
    pkgs.sort(key=lambda item: item[0])
    return top, pkgs


def split_sources(top, pkgs):
    """Fixed by-file split: returns (train, calib, evaluation) lists of (name, text)."""
    train, calib, evaluation = [], [], []
    for i, item in enumerate(top):
        residue = i % HOLDOUT_PERIOD
        if residue == CALIB_RESIDUE:
            calib.append(item)
        elif residue == EVAL_RESIDUE:
            evaluation.append(item)
        else:
            train.append(item)
    return train + list(pkgs), calib, evaluation


def join_files(files) -> str:
    """Concatenate files, each preceded by a ``# ---- file: NAME ----`` line."""
    parts = []
    for name, text in files:
        if not text.endswith("\n"):
            text += "\n"
        parts.append(SEPARATOR.format(name=name) + text)
    return "".join(parts)


def split_files(text: str) -> list[tuple[str, str]]:
    """Inverse of ``join_files``: ``[(name, text), ...]`` from a held-out file."""
    prefix, suffix = SEPARATOR.split("{name}")
    files: list[tuple[str, list[str]]] = []
    for line in text.splitlines(keepends=True):
        if line.startswith(prefix) and line.endswith(suffix):
            files.append((line[len(prefix) : -len(suffix)], []))
        else:
            files[-1][1].append(line)
    result = [(name, "".join(lines)) for name, lines in files]
    assert join_files(result) == text, "held-out file does not round-trip"
    return result


def load_or_split(out_dir: Path, resplit: bool = False):
    """(train, calib, evaluation) file lists.

    If ``out_dir`` already holds ``calib.txt`` and ``eval.txt`` (the shipped ones)
    and ``resplit`` is false, those are reused verbatim and the files they name
    are excluded from training, so the held-out sets never change with the
    Python version that runs this script.  Otherwise the fixed index rule of
    ``split_sources`` is applied to the running interpreter's stdlib and the
    held-out files are (re)written.
    """
    top, pkgs = collect_sources()
    calib_path, eval_path = out_dir / "calib.txt", out_dir / "eval.txt"
    if not resplit and calib_path.exists() and eval_path.exists():
        calib = split_files(calib_path.read_text(encoding="utf-8"))
        evaluation = split_files(eval_path.read_text(encoding="utf-8"))
        held_out = {name for name, _ in calib + evaluation}
        train = [item for item in top if item[0] not in held_out] + list(pkgs)
        return train, calib, evaluation
    train, calib, evaluation = split_sources(top, pkgs)
    write_data(out_dir, join_files(calib), join_files(evaluation))
    return train, calib, evaluation


def write_data(out_dir: Path, calib_text: str, eval_text: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calib.txt").write_text(calib_text, encoding="utf-8")
    (out_dir / "eval.txt").write_text(eval_text, encoding="utf-8")
    (out_dir / "LICENSE-DATA.txt").write_text(
        "calib.txt and eval.txt are unmodified excerpts of the Python standard library\n"
        f"(CPython {platform.python_version()}), concatenated with '# ---- file: NAME ----'\n"
        "separator lines.  They are Copyright (c) 2001 Python Software Foundation; All Rights\n"
        "Reserved, and are distributed under the Python Software Foundation License Version 2\n"
        "(PSF-2.0), https://docs.python.org/3/license.html .  The demo model in model/ was\n"
        "trained on other files of the same standard library.\n",
        encoding="utf-8",
    )


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(train_texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the train split only; returns a ``Qwen3_5Tokenizer``.

    ``AutoTokenizer`` always loads ``qwen3_5_moe_text`` checkpoints with the
    registered ``Qwen3_5Tokenizer`` (a ``PreTrainedTokenizerFast`` / ``TokenizersBackend``
    subclass), which rebuilds its pipeline (NFC normalizer, Qwen split regex,
    byte-level) from the saved vocab/merges.  So the BPE is trained with exactly
    that pipeline: the saved ``tokenizer.json`` and the ``AutoTokenizer`` reload
    then tokenize identically (``verify_load`` checks this).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX, Qwen3_5Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    return Qwen3_5Tokenizer(
        vocab=bpe["vocab"],
        merges=merges,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer, text: str) -> torch.Tensor:
    """Encode a long text to a 1-D int64 tensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# -------------------------------------------------------------------------- model


def build_qwen3_5_moe_config(vocab_size: int, eos_token_id: int, pad_token_id: int):
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(**(MODEL_CONFIG | {"vocab_size": vocab_size}),
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None)


def build_qwen3_moe_config(vocab_size: int, eos_token_id: int, pad_token_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**(QWEN3_MOE_CONFIG | {"vocab_size": vocab_size}),
                          eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None)


# arch -> (config dict, config builder, model class name in transformers)
ARCHS = {
    "qwen3_5_moe": (MODEL_CONFIG, build_qwen3_5_moe_config, "Qwen3_5MoeForCausalLM"),
    "qwen3_moe": (QWEN3_MOE_CONFIG, build_qwen3_moe_config, "Qwen3MoeForCausalLM"),
}


def build_config(tokenizer, arch: str = "qwen3_5_moe"):
    _, builder, _ = ARCHS[arch]
    return builder(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_model(tokenizer, seed: int, arch: str = "qwen3_5_moe"):
    import transformers

    config = build_config(tokenizer, arch)
    torch.manual_seed(seed)
    return getattr(transformers, ARCHS[arch][2])(config)


def count_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    cfg = model.config
    active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
    return {"total": total, "routed_experts": experts, "active_per_token": active}


# ----------------------------------------------------------------------- training


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, train_ids: torch.Tensor, args, log=print) -> dict:
    """AdamW + cosine schedule on random 256-token windows of the train stream."""
    model.train()
    model.config.output_router_logits = True  # adds router_aux_loss_coef * load-balancing loss
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_windows = train_ids.numel() - args.seq_len
    start = time.monotonic()
    hit_budget = False
    step = 0
    loss_ema = None
    for step in range(args.steps):
        if time.monotonic() - start > args.time_budget:
            hit_budget = True
            log(f"time budget of {args.time_budget:.0f}s reached after {step} steps; stopping early")
            break
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, n_windows, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[o : o + args.seq_len] for o in offsets.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        lm_loss = out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item()
        loss_ema = lm_loss if loss_ema is None else 0.95 * loss_ema + 0.05 * lm_loss
        if step % args.log_every == 0 or step == args.steps - 1:
            log(
                f"step {step:5d}/{args.steps}  lm_loss {lm_loss:.4f}  ema {loss_ema:.4f}  "
                f"aux {out.aux_loss.item():.3f}  lr {lr:.2e}  gnorm {grad_norm:.2f}  "
                f"elapsed {time.monotonic() - start:7.1f}s"
            )
    else:
        step = args.steps
    model.config.output_router_logits = False
    model.eval()
    return {
        "steps_done": step,
        "steps_planned": args.steps,
        "train_seconds": time.monotonic() - start,
        "hit_time_budget": hit_budget,
        "final_loss_ema": loss_ema,
        "tokens_seen": step * args.batch_size * args.seq_len,
    }


# --------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_perplexity(model, tokenizer, text: str, window: int = 256, max_windows: int | None = None) -> dict:
    """Token-level perplexity of ``model`` on ``text``.

    The text is tokenized as one stream (no special tokens) and cut into
    non-overlapping windows of ``window`` tokens (the last one may be shorter;
    a window of one token is dropped).  Each window is scored independently
    (no cache carried across windows); the first token of each window is
    context only, every other token is predicted.  Returns
    ``{"ppl", "nll_sum", "tokens", "window"}`` where ``tokens`` is the number
    of predicted tokens and ``ppl = exp(nll_sum / tokens)``.
    """
    ids = encode(tokenizer, text)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, n_tok = 0.0, 0
    starts = list(range(0, ids.numel(), window))
    if max_windows is not None:
        starts = starts[:max_windows]
    for s in starts:
        chunk = ids[s : s + window]
        if chunk.numel() < 2:
            continue
        inp = chunk.unsqueeze(0).to(device)
        logits = model(input_ids=inp, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, inp[0, 1:], reduction="sum")
        nll_sum += nll.item()
        n_tok += chunk.numel() - 1
    model.train(was_training)
    return {"ppl": math.exp(nll_sum / n_tok), "nll_sum": nll_sum, "tokens": n_tok, "window": window}


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int, window: int = 256,
                       max_windows: int | None = None) -> float:
    """Add-one smoothed unigram perplexity on exactly the tokens evaluate_perplexity predicts."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double()
    logp = torch.log((counts + 1) / (counts.sum() + vocab_size))
    nll, n = 0.0, 0
    starts = list(range(0, eval_ids.numel(), window))
    if max_windows is not None:
        starts = starts[:max_windows]
    for s in starts:
        targets = eval_ids[s + 1 : s + window]
        nll -= logp[targets].sum().item()
        n += targets.numel()
    return math.exp(nll / n)


# ------------------------------------------------------------------------- output


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def save_model(model, tokenizer, model_dir: Path, tokenizer_dir: Path | None = None) -> None:
    """Save the bf16 checkpoint and the tokenizer (copied byte-for-byte from ``tokenizer_dir`` if given)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for old in model_dir.iterdir():  # stale shards from a previous run
        if old.is_file():
            old.unlink()
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    if tokenizer_dir is None:
        tokenizer.save_pretrained(model_dir)
    else:
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, model_dir / name)


def reuse_split(src: Path, out_dir: Path):
    """``load_or_split`` on ``src``'s held-out split: its calib/eval/license files are copied into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if src.resolve() != out_dir.resolve():
        for name in ("calib.txt", "eval.txt", "LICENSE-DATA.txt"):
            shutil.copyfile(src / name, out_dir / name)
    return load_or_split(out_dir)


def verify_load(model_dir: Path, reference_tokenizer=None, check_text: str | None = None):
    """Reload checkpoint + tokenizer through the Auto classes (offline), model in float32.

    If ``check_text`` is given, assert that the reloaded tokenizer, the raw
    ``tokenizer.json`` (``tokenizers.Tokenizer.from_file``) and ``reference_tokenizer``
    (the one used for training) all produce the same ids for it.
    """
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    model.eval()
    if check_text is not None:
        ids = encode(tok, check_text).tolist()
        raw = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(check_text, add_special_tokens=False).ids
        assert ids == raw, "AutoTokenizer and tokenizer.json disagree"
        if reference_tokenizer is not None:
            assert ids == encode(reference_tokenizer, check_text).tolist(), "reloaded tokenizer differs from training"
        assert tok.eos_token == EOS_TOKEN and tok.convert_tokens_to_ids(EOS_TOKEN) == model.config.eos_token_id
    return model, tok


def write_report(out_dir: Path, info: dict) -> None:
    cfg = info["config"]
    p = info["params"]
    t = info["train"]
    qwen3_moe = info["arch"] == "qwen3_moe"
    lines = [
        "# moeq second model (qwen3_moe): training record" if qwen3_moe else "# moeq demo model: training record",
        "",
        "Generated by `scripts/train_demo.py`; see its docstring for details.",
        "",
        "## Command",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"Environment: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"tokenizers {info['tokenizers']}, {info['threads']} torch thread(s), CPU `{info['cpu']}`.",
        "",
        "## Results",
        "",
        f"Held-out perplexity on `eval.txt` ({info['eval_tokens']} predicted tokens, non-overlapping "
        f"windows of {info['window']} tokens, checkpoint reloaded in float32):",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| {'qwen3_moe' if qwen3_moe else 'demo'} model (bf16 checkpoint, fp32 compute) | {info['eval_ppl']:.3f} |",
        f"| unigram, add-one smoothed, train-split counts | {info['unigram_ppl']:.3f} |",
        "",
        f"- training wall time: {t['train_seconds']:.0f} s ({t['train_seconds'] / 60:.1f} min) for "
        f"{t['steps_done']}/{t['steps_planned']} steps"
        + (" (**stopped by the time budget**)" if t["hit_time_budget"] else "")
        + f"; total script time {info['total_seconds']:.0f} s",
        f"- tokens seen: {t['tokens_seen']:,} (train stream: {info['train_tokens']:,} tokens); "
        f"final train loss (EMA) {t['final_loss_ema']:.3f}",
        f"- parameters: {p['total']:,} total, {p['routed_experts']:,} in routed experts, "
        f"~{p['active_per_token']:,} active per token",
        f"- checkpoint `model/`: {info['checkpoint_bytes'] / 1e6:.2f} MB (bfloat16 safetensors + config + tokenizer)",
        "",
        "## Data",
        "",
        f"CPython {info['python']} standard library sources (PSF-2.0, see `LICENSE-DATA.txt`). "
        f"Top-level `*.py` files sorted by name (excluding `{'`, `'.join(SKIP_FILE_PREFIXES)}`); "
        f"file index i % {HOLDOUT_PERIOD} == {CALIB_RESIDUE} -> `calib.txt`, "
        f"i % {HOLDOUT_PERIOD} == {EVAL_RESIDUE} -> `eval.txt`; all other top-level files plus the packages "
        f"{', '.join(TRAIN_PACKAGES)} (test directories excluded) are the train split.",
        "",
        f"- train: {info['n_train_files']} files, {info['train_chars']:,} chars",
        f"- calib.txt: {info['n_calib_files']} files ({', '.join(info['calib_files'])}), {info['calib_chars']:,} chars",
        f"- eval.txt: {info['n_eval_files']} files ({', '.join(info['eval_files'])}), {info['eval_chars']:,} chars",
        "",
        (f"Held-out split and tokenizer reused from `{info['data_from']}` (files copied byte-for-byte; "
         f"vocab {cfg['vocab_size']}), so its calib.txt / eval.txt tokenize identically for both models."
         if info["data_from"] else
         "Tokenizer: byte-level BPE (HF `tokenizers`) trained on the train split only, "
         f"vocab {cfg['vocab_size']}, eos = pad = `{EOS_TOKEN}` (id 0), no BOS; saved as `Qwen3_5Tokenizer` "
         "(what `AutoTokenizer` uses for this model type) with the same NFC + split-regex + byte-level pipeline."),
        "",
    ]
    if qwen3_moe:
        lines += [
            "## Model (`Qwen3MoeForCausalLM`, `Qwen3MoeConfig`)",
            "",
            f"- layers: {cfg['num_hidden_layers']}, all standard (GQA, q/k RMSNorm, rotary) attention + MoE",
            f"- hidden_size {cfg['hidden_size']}, vocab {cfg['vocab_size']}, untied lm_head, plain RMSNorm (x * w)",
            f"- attention: {cfg['num_attention_heads']} heads x head_dim {cfg['head_dim']} "
            f"({cfg['num_key_value_heads']} KV heads)",
            f"- MoE every layer: {cfg['num_experts']} routed experts (top-{cfg['num_experts_per_tok']}, "
            f"norm_topk_prob {cfg['norm_topk_prob']}), moe_intermediate_size {cfg['moe_intermediate_size']}, "
            "no shared expert",
        ]
    else:
        lines += [
            "## Model (`Qwen3_5MoeForCausalLM`, `Qwen3_5MoeTextConfig`)",
            "",
            f"- layers: {cfg['num_hidden_layers']}, layer_types {cfg['layer_types']}",
            f"- hidden_size {cfg['hidden_size']}, vocab {cfg['vocab_size']}, untied lm_head",
            f"- full attention: {cfg['num_attention_heads']} heads x head_dim {cfg['head_dim']} "
            f"({cfg['num_key_value_heads']} KV heads), output-gated, partial rotary",
            f"- gated delta net: {cfg['linear_num_key_heads']} key heads x {cfg['linear_key_head_dim']}, "
            f"{cfg['linear_num_value_heads']} value heads x {cfg['linear_value_head_dim']}, "
            f"conv kernel {cfg['linear_conv_kernel_dim']}",
            f"- MoE every layer: {cfg['num_experts']} routed experts (top-{cfg['num_experts_per_tok']}), "
            f"moe_intermediate_size {cfg['moe_intermediate_size']}, shared expert "
            f"{cfg['shared_expert_intermediate_size']} (sigmoid-gated)",
        ]
    lines += [
        f"- router aux (load-balancing) loss coef {cfg['router_aux_loss_coef']} during training",
        "- every quantizable weight has input dim K divisible by 128",
        "",
        "## Training hyper-parameters",
        "",
        f"seed {info['args']['seed']}, AdamW (betas 0.9/0.95, weight decay {info['args']['weight_decay']} on "
        f"matrices), peak lr {info['args']['lr']}, {info['args']['warmup']} warmup steps then cosine to 10%, "
        f"batch {info['args']['batch_size']} x {info['args']['seq_len']} tokens (random windows of the train "
        f"stream), grad clip {info['args']['grad_clip']}, float32 master weights, "
        f"{'bf16 autocast' if info['args']['bf16_autocast'] else 'float32'} compute, "
        f"experts implementation `{info['experts_impl']}`, time budget {info['args']['time_budget']:.0f} s.",
        "",
        "## Expert load (eval.txt, fraction of top-k assignments per expert, per layer)",
        "",
    ]
    for i, loads in enumerate(info["expert_load"]):
        lines.append(f"- layer {i}: " + " ".join(f"{x:.3f}" for x in loads))
    lines.append("")
    (out_dir / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")


@torch.no_grad()
def expert_load(model, ids: torch.Tensor, window: int = 256, max_windows: int = 32) -> list[list[float]]:
    """Fraction of top-k routing assignments per expert, per layer, on the first windows of ``ids``."""
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts)
    for s in range(0, min(ids.numel(), window * max_windows), window):
        chunk = ids[s : s + window].unsqueeze(0)
        out = model(input_ids=chunk, output_router_logits=True, use_cache=False)
        for layer, logits in enumerate(out.router_logits):
            top = logits.topk(cfg.num_experts_per_tok, dim=-1).indices
            counts[layer] += torch.bincount(top.flatten(), minlength=cfg.num_experts).float()
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="qwen3_5_moe",
                    help="qwen3_5_moe: the demo model (default); qwen3_moe: the second, plain Qwen3-MoE model")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help=f"output directory (default {DEFAULT_OUT}, or {QUICK_OUT} with --quick; "
                         f"{QWEN3_MOE_OUT}[_quick] with --arch qwen3_moe)")
    ap.add_argument("--data-from", type=Path, default=None,
                    help="reuse this directory's calib.txt/eval.txt split and model/ tokenizer instead of "
                         f"splitting and training a tokenizer (default: {DEFAULT_OUT} with --arch qwen3_moe)")
    ap.add_argument("--quick", action="store_true", help="1-minute smoke run (few steps, short eval)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400; 25 with --quick)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="training wall-clock cap in seconds (default 1500; 60 with --quick)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of --steps)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bf16-autocast", dest="bf16_autocast", action="store_false",
                    help="train matmuls in float32 (default: bf16 autocast, ~1.5x faster on CPUs with AMX/AVX512-BF16;"
                         " master weights and optimizer state are float32 either way)")
    ap.add_argument("--resplit", action="store_true",
                    help="recompute calib.txt/eval.txt from this interpreter's stdlib even if they exist")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-max-windows", type=int, default=None,
                    help="limit evaluation windows (default all; 8 with --quick)")
    args = ap.parse_args(argv)
    if args.arch != "qwen3_5_moe":
        if args.out_dir is None:
            args.out_dir = Path(f"{QWEN3_MOE_OUT}_quick") if args.quick else QWEN3_MOE_OUT
        if args.out_dir.resolve() == DEFAULT_OUT.resolve():
            ap.error(f"--arch {args.arch} must not write into the demo directory {DEFAULT_OUT}")
        if args.data_from is None:
            args.data_from = DEFAULT_OUT
    if args.out_dir is None:
        args.out_dir = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.steps is None:
        args.steps = 25 if args.quick else 400
    if args.time_budget is None:
        args.time_budget = 60.0 if args.quick else 1500.0
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    if args.eval_max_windows is None and args.quick:
        args.eval_max_windows = 8
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.monotonic()
    torch.set_num_threads(args.threads)
    if args.threads == 1:  # keep the tokenizers library (rayon) on one core too
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    import tokenizers
    import transformers

    def log(msg):
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)

    out_dir: Path = args.out_dir
    model_dir = out_dir / "model"

    if args.data_from is not None:
        train_files, calib_files, eval_files = reuse_split(args.data_from, out_dir)
    else:
        train_files, calib_files, eval_files = load_or_split(out_dir, resplit=args.resplit)
    calib_text, eval_text = join_files(calib_files), join_files(eval_files)
    train_text = join_files(train_files)
    log(f"data: {len(train_files)} train files ({len(train_text):,} chars), "
        f"calib {len(calib_files)} files ({len(calib_text):,}), eval {len(eval_files)} files ({len(eval_text):,})")

    tokenizer_dir = None if args.data_from is None else args.data_from / "model"
    if tokenizer_dir is None:
        tokenizer = train_tokenizer([join_files([f]) for f in train_files], MODEL_CONFIG["vocab_size"])
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    train_ids = encode(tokenizer, train_text)
    log(f"tokenizer: vocab {len(tokenizer)}, train stream {train_ids.numel():,} tokens "
        f"({len(train_text) / train_ids.numel():.2f} chars/token)")

    model = build_model(tokenizer, args.seed, args.arch)
    params = count_params(model)
    experts_impl = model.config._experts_implementation
    log(f"model: {params['total']:,} params ({params['active_per_token']:,} active/token), "
        f"experts implementation {model.config._experts_implementation!r}")

    stats = train(model, train_ids, args, log=log)
    log(f"training done: {stats['steps_done']} steps in {stats['train_seconds']:.0f}s")

    save_model(model, tokenizer, model_dir, tokenizer_dir)
    del model
    model, tok = verify_load(model_dir, tokenizer, check_text=calib_text + eval_text)
    res = evaluate_perplexity(model, tok, eval_text, window=256, max_windows=args.eval_max_windows)
    eval_ids = encode(tok, eval_text)
    uni = unigram_perplexity(train_ids, eval_ids, len(tok), window=256, max_windows=args.eval_max_windows)
    log(f"eval: model ppl {res['ppl']:.3f} vs unigram ppl {uni:.3f} on {res['tokens']} tokens")
    metrics = {"eval_ppl": res["ppl"], "unigram_ppl": uni, "eval_tokens": res["tokens"], "window": res["window"]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    cfg = model.config
    info = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO_ROOT)] + list(sys.argv[1:] if argv is None else argv)),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "threads": args.threads, "cpu": cpu_name(),
        "eval_ppl": res["ppl"], "unigram_ppl": uni, "eval_tokens": res["tokens"], "window": res["window"],
        "train": stats, "params": params, "checkpoint_bytes": dir_size(model_dir),
        "total_seconds": time.monotonic() - t0, "train_tokens": train_ids.numel(),
        "n_train_files": len(train_files), "train_chars": len(train_text),
        "n_calib_files": len(calib_files), "calib_chars": len(calib_text),
        "calib_files": [n for n, _ in calib_files],
        "n_eval_files": len(eval_files), "eval_chars": len(eval_text),
        "eval_files": [n for n, _ in eval_files],
        "config": {k: getattr(cfg, k) for k in ARCHS[args.arch][0]} | {"vocab_size": cfg.vocab_size},
        "arch": args.arch, "data_from": None if args.data_from is None else str(args.data_from),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "experts_impl": experts_impl,
        "expert_load": expert_load(model, eval_ids, max_windows=4 if args.quick else 32),
    }
    write_report(out_dir, info)
    log(f"wrote {out_dir} (checkpoint {info['checkpoint_bytes'] / 1e6:.2f} MB)")
    return metrics


if __name__ == "__main__":
    main()
