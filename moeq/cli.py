"""The `moeq` command line: quantize, eval, inspect.

    moeq quantize                      # the demo model -> NVFP4, ModelOpt layout
    moeq quantize --model DIR --recipe fp8 --calib data.txt --out DIR-fp8 --eval
    moeq eval --model DIR --quantized DIR-fp8
    moeq inspect DIR-fp8
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import json
import logging
import sys
import time
from pathlib import Path

from . import data as D
from .cli_checks import CliError, _check_out_dir, _check_same_model, _check_same_vocab, _model_path, _preflight, load_model
from .recipes import KV_CACHE_FORMATS, PRESETS

# torch and transformers are imported inside the commands, after the arguments are checked:
# `moeq --help` and argument errors answer in well under a second.
DTYPES = ("auto", "float32", "bfloat16", "float16")

log = logging.getLogger("moeq")


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) + sum(f.stat().st_size for f in path.glob("*.bin"))


def _max_positions(config) -> int | None:
    cfg = getattr(config, "text_config", None) or config
    return getattr(cfg, "max_position_embeddings", None)


def _windows(tokenizer, source, seq_len, n, model_config):
    limit = _max_positions(model_config)
    if limit is not None and seq_len > limit:
        raise CliError(f"--seq-len {seq_len} is beyond the model's limit of {limit} positions")
    try:
        return D.token_windows(tokenizer, D.read_text(source), seq_len, n)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e


def _init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when launched by torchrun."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def cmd_quantize_streaming(a, path: Path, out: Path, rank: int, world: int) -> int:
    import torch
    import transformers

    from .coverage import write_coverage
    from .streaming import quantize_streaming

    if a.eval:
        raise CliError("--eval needs the whole model in memory; with --streaming run `moeq eval` afterwards")
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    config = transformers.AutoConfig.from_pretrained(path)
    windows = _windows(tok, a.calib, a.seq_len, a.samples, config)[rank::world]
    recipe = _recipe(a)
    device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    dtype = None if a.dtype == "auto" else getattr(torch, a.dtype)
    report, exp = quantize_streaming(path, recipe, D.batches(windows, a.batch_size), out, a.layout,
                                     calib_all_experts=a.calib_all_experts, overwrite=a.overwrite, device=device,
                                     dtype=dtype, write=rank == 0, trust_remote_code=a.trust_remote_code,
                                     algorithm=a.algorithm)
    if rank != 0:
        return 0
    png, js = write_coverage(report.tokens_per_expert, out) if report.tokens_per_expert else (None, None)
    never = sum(len(v) for v in report.never_routed.values())
    print("\n".join([
        "", f"moeq quantize --streaming: {path} -> {out}",
        f"  recipe / layout      {recipe.name} / {a.layout}",
        f"  time                 {time.perf_counter() - t0:.1f}s",
        f"  tokens calibrated    {report.calib_tokens * world} ({world} process{'es' if world > 1 else ''})",
        f"  modules              {len(report.quantized)} quantized, {len(report.excluded)} excluded",
        f"  experts never routed {never}",
        f"  size                 {_weights_bytes(path) / 2**20:.1f} MiB -> {_weights_bytes(out) / 2**20:.1f} MiB",
        f"  expert coverage      {png}, {js}"] + [f"  {line}" for line in report.algorithm_lines()]
        + [f"  warning: {w}" for w in report.warnings]))
    return 0


def _recipe(a):
    from .recipes import get_recipe

    recipe = get_recipe(a.recipe)
    if a.kv_cache:
        recipe = dataclasses.replace(recipe, kv_cache=a.kv_cache)
    return recipe.with_exclude(add=a.exclude) if a.exclude else recipe


def cmd_quantize(a) -> int:
    t0 = time.perf_counter()
    path = _model_path(a.model)
    out = Path(a.out or f"moeq-{'demo' if a.model == 'demo' else path.name}-{a.recipe}")
    _check_out_dir(out, path, a.overwrite)
    if a.eval and not (a.eval_data or a.model == "demo"):
        raise CliError("--eval needs --eval-data FILE for a non-demo model (held-out text, not the calibration text)")
    if a.streaming and a.eval:
        raise CliError("--eval needs the whole model in memory; with --streaming run `moeq eval` afterwards")
    from .algorithms import name as algorithm_name, parse as parse_algorithm

    try:
        a.algorithm = algorithm_name(parse_algorithm(a.algorithm))
    except (ValueError, NotImplementedError) as e:
        raise CliError(str(e)) from e
    calib_src = "demo" if a.calib == "demo" else a.calib
    try:  # read (and validate) the text before loading anything heavy
        D.read_text(calib_src)
        if a.eval:
            D.read_text(a.eval_data or D.DEMO_EVAL)
    except (FileNotFoundError, ValueError, IsADirectoryError, PermissionError) as e:
        raise CliError(str(e)) from e
    _preflight(path, _recipe(a), a.layout, a.exclude, a.streaming)

    import moeq

    from .coverage import write_coverage

    rank, world = _init_distributed()
    import torch

    from .quantization import free_bytes

    avail = free_bytes(torch.device("cpu"))
    if not a.streaming and avail and _weights_bytes(path) > 0.8 * avail and not a.device_map:
        log.warning("the checkpoint (%.1f GiB) would not fit in available memory (%.1f GiB): using --streaming",
                    _weights_bytes(path) / 2**30, avail / 2**30)
        a.streaming = True
    if a.streaming:
        return cmd_quantize_streaming(a, path, out, rank, world)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    config = transformers.AutoConfig.from_pretrained(path)
    if calib_src == "demo" and a.model != "demo":
        log.warning("calibrating a user model on the demo text (Python code); pass --calib with text of your domain")
    windows = _windows(tok, calib_src, a.seq_len, a.samples, config)[rank::world]
    evalb = None
    if a.eval:
        evalb = D.batches(_windows(tok, a.eval_data or D.DEMO_EVAL, a.seq_len, a.eval_samples, config), a.batch_size)
    model, tok, path = load_model(a.model, a.device, a.dtype, a.device_map)
    calib = D.batches(windows, a.batch_size)
    base = copy.deepcopy(model) if a.eval else None
    recipe = _recipe(a)
    report = moeq.quantize(model, recipe, calib, calib_all_experts=a.calib_all_experts, layout=a.layout,
                           algorithm=a.algorithm)
    if rank != 0:
        return 0  # statistics were reduced across ranks inside quantize; rank 0 writes
    ev = moeq.evaluate.compare(base, model, evalb, progress=True) if a.eval else None
    exp = moeq.export(model, out, a.layout, overwrite=a.overwrite, trust_remote_code=a.trust_remote_code)
    png, js = write_coverage(report.tokens_per_expert, out) if report.tokens_per_expert else (None, None)
    dt = time.perf_counter() - t0
    never = sum(len(v) for v in report.never_routed.values())
    lines = [
        "",
        f"moeq quantize: {path} -> {out}",
        f"  recipe / layout      {recipe.name} / {a.layout}" + (f" / {report.algorithm}" if report.algorithm != "max" else ""),
        f"  time                 {dt:.1f}s (calibration {report.calib_seconds:.1f}s"
        + (f", {report.algorithm} {report.algorithm_seconds:.1f}s" if report.algorithm != "max" else "")
        + f", export {exp.seconds:.1f}s)",
        f"  tokens calibrated    {report.calib_tokens} ({report.calib_batches} batches of {a.batch_size} x {a.seq_len})",
        f"  modules              {len(report.quantized)} quantized, {len(report.excluded)} excluded",
        f"  experts never routed {never}" + (f" (see {png})" if never and png else ""),
        f"  size                 {_weights_bytes(path) / 2**20:.1f} MiB -> {_weights_bytes(out) / 2**20:.1f} MiB",
    ]
    if ev is not None:
        lines += [f"  perplexity           {ev.ppl_base:.3f} -> {ev.ppl_quant:.3f} ({ev.tokens} tokens)",
                  f"  KL / top-1 agreement {ev.kl:.5f} nats / {100 * ev.top1_agreement:.2f}%"]
    if png:
        lines.append(f"  expert coverage      {png}, {js}")
    print("\n".join(lines))
    return 0


def cmd_eval(a) -> int:
    quant_path = Path(a.quantized)
    if not (quant_path / "config.json").is_file():
        raise CliError(f"--quantized {quant_path} is not a checkpoint directory (no config.json); pass a directory written by moeq quantize")
    base_path = _model_path(a.model or "demo")
    _check_same_model(base_path, quant_path, a.model is not None)
    src = a.data or (D.DEMO_EVAL if base_path == D.DEMO_MODEL else None)
    if src is None:
        raise CliError("pass --data FILE (held-out text) to evaluate a non-demo model")
    try:
        D.read_text(src)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e

    import moeq

    base, tok, _ = load_model(str(base_path), a.device, a.dtype)
    _check_same_vocab(tok, quant_path)
    try:
        quant = moeq.load(quant_path, dtype=base.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e
    quant.to(base.device)
    b = D.batches(_windows(tok, src, a.seq_len, a.samples, base.config), a.batch_size)
    res = moeq.evaluate.compare(base, quant, b, progress=not a.json)
    print(json.dumps(res.as_dict(), indent=2) if a.json else res.table())
    return 0


def cmd_inspect(a) -> int:
    from .inspect_checkpoint import as_json, inspect_checkpoint

    try:
        res = inspect_checkpoint(a.dir)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e
    print(as_json(res) if a.json else res.table())
    return 1 if res.problems else 0


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (the usage block is what --help is for)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moeq", description="Post-training quantization of MoE (and dense) models in transformers")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)

    def common(s, samples):
        s.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sample (default 256)")
        s.add_argument("--samples", type=_positive_int, default=samples, help=f"number of samples (default {samples})")
        s.add_argument("--batch-size", type=_positive_int, default=8)
        s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        s.add_argument("--dtype", default="auto", choices=DTYPES, help="auto (the checkpoint's), float32, bfloat16, float16")
        s.add_argument("--debug", action="store_true", help="show the Python traceback of errors")

    q = sub.add_parser("quantize", help="calibrate, quantize and export a model (default: the demo model to NVFP4)")
    q.add_argument("--model", default="demo", help="checkpoint directory, or 'demo' (default)")
    q.add_argument("--recipe", default="nvfp4", choices=list(PRESETS))
    q.add_argument("--calib", default="demo", help="text FILE, DIR of text files, or 'demo'")
    q.add_argument("--layout", default="modelopt", choices=["modelopt", "compressed-tensors", "mxfp4-native"])
    q.add_argument("--kv-cache", choices=list(KV_CACHE_FORMATS),
                   help="also calibrate static per-layer FP8 scales for the KV cache (keys after rotary embedding, values)")
    q.add_argument("--out", help="output directory (default ./moeq-<model>-<recipe>)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    q.add_argument("--calib-all-experts", action="store_true", help="every expert's statistics see every token")
    q.add_argument("--algorithm", default="max",
                   help="calibration algorithm: max (default), awq (activation-aware scales folded into the weights), "
                        "mse (clipping search per scale), gptq (error-compensated weights from per-expert Hessians), "
                        "or a combination such as mse+gptq or awq+gptq")
    q.add_argument("--trust-remote-code", action="store_true",
                   help="carry the model's own .py files and auto_map into the export (left out by default)")
    q.add_argument("--exclude", action="append", default=[], help="extra fnmatch pattern of modules to leave unquantized")
    q.add_argument("--device-map", help="accelerate device map for models bigger than one device (e.g. auto)")
    q.add_argument("--streaming", action="store_true",
                   help="layer by layer from the checkpoint shards (automatic when the model does not fit in memory)")
    q.add_argument("--eval", action="store_true", help="perplexity / KL before and after on held-out text")
    q.add_argument("--eval-data", help="held-out text for --eval (default: the demo eval split for the demo model)")
    q.add_argument("--eval-samples", type=_positive_int, default=32)
    common(q, 64)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement of a quantized checkpoint vs its base")
    e.add_argument("--model", help="the unquantized checkpoint directory, or 'demo' (default: the demo, only for an export of the demo)")
    e.add_argument("--quantized", required=True, help="directory written by moeq quantize")
    e.add_argument("--data", help="held-out text FILE (default: the demo eval split for the demo model)")
    e.add_argument("--json", action="store_true")
    common(e, 32)
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="what a quantized checkpoint holds; non-zero exit on problems")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.add_argument("--debug", action="store_true", help="show the Python traceback of errors")
    i.set_defaults(func=cmd_inspect)
    return p


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix (bad input, full disk), else None
    (a bug: the traceback is shown)."""
    from .errors import user_errors

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left on the device{where}; free space or choose another --out (nothing was left half-written)"
    if isinstance(e, user_errors()):
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.cmd is None:
        args = build_parser().parse_args(["quantize"] + list(argv if argv is not None else sys.argv[1:]))
    from .checkpoint.layouts import UnsupportedExport

    try:
        return args.func(args)
    except (CliError, UnsupportedExport) as e:
        if args.debug:
            raise
        print(f"moeq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("moeq: interrupted; the output directory was not written (a --streaming run resumes from its last "
              "finished layer when the same command runs again)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - classified below; bugs are re-raised with their traceback
        msg = None if args.debug else _user_error(e)
        if msg is None:
            raise
        print(f"moeq: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 1 if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) else 2


if __name__ == "__main__":
    sys.exit(main())
