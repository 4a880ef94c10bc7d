"""Calibration / evaluation text -> fixed-length token windows.

Text comes from a file, a directory (every .txt/.py/.md/.json/.jsonl file, sorted by
path so the order is reproducible) or the demo split shipped with the package.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_MODEL = DEMO_DIR / "model"
DEMO_CALIB = DEMO_DIR / "calib.txt"
DEMO_EVAL = DEMO_DIR / "eval.txt"
_TEXT_SUFFIXES = {".txt", ".py", ".md", ".json", ".jsonl", ".rst"}


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
        text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    else:
        text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"calibration/evaluation text from {p} is empty")
    return text


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of the tokenized text (the tail is dropped)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i:i + batch_size] for i in range(0, windows.shape[0], batch_size)]
