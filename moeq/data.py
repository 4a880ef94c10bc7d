"""Calibration / evaluation text -> fixed-length token windows.

Text comes from a file, a directory (every .txt/.py/.md/.json/.jsonl file, sorted by
path so the order is reproducible) or the demo split shipped with the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_MODEL = DEMO_DIR / "model"
DEMO_CALIB = DEMO_DIR / "calib.txt"
DEMO_EVAL = DEMO_DIR / "eval.txt"
_TEXT_SUFFIXES = {".txt", ".py", ".md", ".json", ".jsonl", ".rst"}


def _read_utf8(f: Path) -> str:
    """A text file's content; binary files and invalid UTF-8 are refused, not decoded into
    replacement characters that would silently become calibration tokens."""
    raw = f.read_bytes()
    if b"\x00" in raw[:1 << 16]:
        raise ValueError(f"{f} is a binary file, not text; pass UTF-8 text (a .txt file or a directory of them)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{f} is not valid UTF-8 (byte {e.start}, line {line}); convert it to UTF-8 "
                         f"(e.g. iconv -f latin1 -t utf-8) or pass another file") from None


def read_text(source: "str | Path") -> str:
    """The text of a file, of all text files under a directory, or of 'demo'."""
    if str(source) == "demo":
        source = DEMO_CALIB
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"calibration/evaluation data {p} does not exist (pass a text file, a directory or 'demo')")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"directory {p} has no text files ({', '.join(sorted(_TEXT_SUFFIXES))})")
        text = "\n".join(_read_utf8(f) for f in files)
    else:
        text = _read_utf8(p)
    if not text.strip():
        raise ValueError(f"calibration/evaluation text from {p} is empty")
    return text


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> "torch.Tensor":
    """Non-overlapping windows [n, seq_len] of the tokenized text (the tail is dropped)."""
    import torch  # here, not at module level: `moeq --help` must not pay for torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batches(windows: "torch.Tensor", batch_size: int) -> "list[torch.Tensor]":
    return [windows[i:i + batch_size] for i in range(0, windows.shape[0], batch_size)]
