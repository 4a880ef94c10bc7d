"""Checkpoint directories like a user's: a tiny model saved with save_pretrained plus a
byte-level BPE tokenizer trained on a slice of the demo calibration text."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models as tm  # noqa: E402

from moeq.data import DEMO_CALIB  # noqa: E402


def make_model_dir(path: Path, model_type: str = "qwen3_5_moe", **kw) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([DEMO_CALIB.read_text()[:200_000]],
                            trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ġ").save_pretrained(path)
    tm.tiny_model(model_type, **kw).save_pretrained(path)
    return path
