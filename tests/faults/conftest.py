"""One tiny model directory for the whole fault suite, its in-memory quantization, and the
exports of uninterrupted runs that every interrupted-then-re-run export must equal byte
for byte. Tests must not modify what these fixtures return."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

import moeq
from moeq.streaming import quantize_streaming

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models as tm  # noqa: E402

SHARD_BYTES = 48 * 1024  # several shards per layer: faults can land between them
RECIPE, LAYOUT = "nvfp4", "modelopt"


@dataclass
class Setup:
    src: Path
    calib: list
    model: object  # quantized in memory, loaded from src (so the export carries src's files)
    ref_mem: Path
    ref_stream: Path

    def export(self, out, **kw):
        return moeq.export(self.model, out, kw.pop("layout", LAYOUT), progress=False, max_shard_bytes=SHARD_BYTES, **kw)

    def stream(self, out, recipe=RECIPE, calib=None, **kw):
        return quantize_streaming(kw.pop("src", self.src), recipe, self.calib if calib is None else calib, out,
                                  kw.pop("layout", LAYOUT), progress=False,
                                  max_shard_bytes=kw.pop("max_shard_bytes", SHARD_BYTES), **kw)


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("faults")
    src = root / "models" / "tiny-qwen3_5_moe"
    with tm.single_thread():
        tm.tiny_model("qwen3_5_moe").save_pretrained(src)
        (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}\n')
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        calib = [tm.random_input_ids(model, batch=2, seq=16, seed=s) for s in range(2)]
        moeq.quantize(model, RECIPE, calib, progress=False)
        s = Setup(src, calib, model, root / "ref" / "mem", root / "ref" / "stream")
        s.export(s.ref_mem)
        s.stream(s.ref_stream)
    assert len(list(s.ref_stream.glob("*.safetensors"))) >= 6  # the faults below need several shards
    return s


@pytest.fixture(scope="module")
def own(setup, tmp_path_factory):
    """A private copy of the model folder (next to other files of the user's) and a model
    quantized from it: tests point the output at it, and must not endanger the shared one."""
    models = tmp_path_factory.mktemp("own") / "models"
    src = models / "m"
    shutil.copytree(setup.src, src)
    (models / "notes.txt").write_text("the user's other files\n")
    with tm.single_thread():
        model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
        moeq.quantize(model, RECIPE, setup.calib, progress=False)
    return src, model


def runs(setup, own):
    """The two ways to write an export, from the private model folder."""
    src, model = own
    return {"export": lambda out, **kw: moeq.export(model, out, progress=False, max_shard_bytes=SHARD_BYTES, **kw),
            "streaming": lambda out, **kw: setup.stream(out, src=src, **kw)}


@pytest.fixture
def odd_source(setup, tmp_path):
    """A model folder with a link leading out of it, a link inside it and remote code."""
    src = tmp_path / "models" / "odd"
    shutil.copytree(setup.src, src)
    (tmp_path / "secret.txt").write_text("private key")
    (src / "special_tokens_map.json").symlink_to(tmp_path / "secret.txt")
    (src / "sub").mkdir()
    (src / "sub" / "vocab.txt").write_text("a b c\n")
    (src / "vocab.txt").symlink_to("sub/vocab.txt")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_odd.OddConfig", "AutoModelForCausalLM": "modeling_odd.OddForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    for f in ("configuration_odd.py", "modeling_odd.py"):
        (src / f).write_text("raise RuntimeError('remote code ran')\n")
    return src
