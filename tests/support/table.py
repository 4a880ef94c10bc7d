"""Render sweep results as the README's supported-models table, and read / replace that README section.

The section sits between :data:`START` and :data:`END` under ``## Supported models``; ``scripts/support_table.py``
rewrites it and ``tests/support/test_support.py`` fails when it differs from a fresh rendering.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import transformers

from .sweep import LAYOUTS, PRESETS, REFUSED, SHAPE_REFUSAL, ModelResult

START = "<!-- support-table:start -->"
END = "<!-- support-table:end -->"
HEADING = "## Supported models"
BEFORE_HEADING = "## How it works"  #: a missing section is inserted right before this heading
README = Path(__file__).resolve().parents[2] / "README.md"
REGENERATE = "python scripts/support_table.py"
#: vLLM loader verdicts written by scripts/vllm_sweep.py (slow, needs a vLLM environment; committed)
VLLM_VERDICTS = Path(__file__).resolve().parent / "vllm_verdicts.json"
VLLM_SWEEP = "scripts/vllm_sweep.py"

_SHORT = {"modelopt": "modelopt", "compressed-tensors": "compressed-tensors"}
_MARK = {"pass": "✅", "fail": "❌", "n/a": "—", "skipped": "⏭"}


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _kind(status: str) -> str:
    return status.split(":", 1)[0]


def _cell(r: ModelResult, preset: str) -> str:
    return " / ".join(_MARK[_kind(r.status(preset, layout))] for layout in LAYOUTS)


def _shapes(status: str) -> bool:
    return status.startswith(SHAPE_REFUSAL)


def _code(text: str) -> str:
    """A markdown code span safe inside a table cell."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


_NOTE_LIMIT = 220


def _short(msg: str) -> str:
    return msg if len(msg) <= _NOTE_LIMIT else msg[: _NOTE_LIMIT - 1].rstrip() + "…"


def load_vllm_verdicts() -> dict:
    return json.loads(VLLM_VERDICTS.read_text()) if VLLM_VERDICTS.exists() else {"vllm": None, "presets": [], "types": {}}


def _vllm_mark(v: str | None) -> str:
    if v is None:
        return "not run"
    if v == "pass":
        return "✅"
    if v.startswith("pass"):
        return "✅¹"
    if v.startswith("refused"):
        return "—"
    return "❌"


def vllm_cell(verdicts: dict, model_type: str) -> str:
    """The vLLM column (nvfp4 modelopt / compressed-tensors) of one model type."""
    entry = verdicts.get("types", {}).get(model_type)
    if entry is None:
        return "not run"
    if "status" in entry:
        return "no model class"
    return " / ".join(_vllm_mark(entry.get(f"nvfp4 {lay}")) for lay in LAYOUTS)


def vllm_notes(verdicts: dict, model_type: str) -> list[str]:
    entry = verdicts.get("types", {}).get(model_type) or {}
    by_msg: dict[str, list[str]] = {}
    for lay in LAYOUTS:
        v = entry.get(f"nvfp4 {lay}")
        if v and v.startswith("fail"):
            by_msg.setdefault(v.split(":", 1)[1].strip(), []).append(lay)
    out = [f"vLLM nvfp4 {', '.join(w)}: {_code(_short(m))}" for m, w in by_msg.items()]
    v = entry.get("w4a16-int4 compressed-tensors")
    if v is not None:
        out.append(f"vLLM w4a16-int4 compressed-tensors: {_vllm_mark(v)}"
                   + (f" {_code(_short(v.split(':', 1)[1].strip()))}" if v.startswith("fail") else ""))
    return out


def notes(r: ModelResult, verdicts: dict | None = None) -> str:
    parts = list(r.notes)
    if r.skip_reason is not None:
        parts.append("skipped: " + _code(_short(r.skip_reason)))
    by_msg: dict[str, list[str]] = {}
    applicable = 0
    for preset in PRESETS:
        for layout in LAYOUTS:
            st = r.status(preset, layout)
            applicable += _kind(st) != "n/a"
            if _kind(st) == "fail":
                by_msg.setdefault(st.split(":", 1)[1].strip(), []).append(f"{preset} {layout}")
    for msg, where in by_msg.items():
        label = "all" if len(by_msg) == 1 and len(where) == applicable else ", ".join(where)
        parts.append(f"{label}: {_code(_short(msg))}")
    refused = [f"{p} {lay}" for p in PRESETS for lay in LAYOUTS if (p, lay) not in REFUSED
               and r.skip_reason is None and _kind(r.status(p, lay)) == "n/a" and not _shapes(r.status(p, lay))]
    if refused:
        parts.append(f"refused ({', '.join(refused)}): expert biases, which vLLM 0.33 loads only with w4a16-int4 "
                     "compressed-tensors (MXFP4: in gpt-oss's own `mxfp4-native` layout)")
    shapes = [p for p in PRESETS if r.skip_reason is None and _shapes(r.status(p, LAYOUTS[-1]))]
    for p in shapes:
        parts.append(f"{p} refused: {_code(_short(r.status(p, LAYOUTS[-1])[len(SHAPE_REFUSAL):]))}")
    parts += vllm_notes(verdicts or {}, r.model_type)
    return "; ".join(parts).replace("\n", " ")


def passing(results: list[ModelResult]) -> list[ModelResult]:
    return [r for r in results if r.passed]


def render(results: list[ModelResult], verdicts: dict | None = None) -> str:
    """The markdown between the markers (without the markers), deterministic for a given set of results and
    vLLM verdicts (default: the committed vllm_verdicts.json)."""
    verdicts = load_vllm_verdicts() if verdicts is None else verdicts
    rows = sorted(results, key=lambda r: (r.model_type, r.experts_class))
    n_types = len({r.model_type for r in rows})
    n_pass = len({r.model_type for r in passing(rows)})
    layouts = " / ".join(_SHORT[x] for x in LAYOUTS)
    lines = [
        f"Generated by `{REGENERATE}` from the sweep in `tests/support/` (transformers {_minor(transformers.__version__)}): "
        f"every experts class decorated with `use_experts_implementation` in the installed transformers, in a tiny "
        f"random model of its model type, is quantized (2 calibration batches, default experts implementation), "
        f"exported in each layout and reloaded with `moeq.load`; ✅ means the reloaded model's output is "
        f"bit-identical to the in-memory quantized model's. — = refused by design (vLLM's modelopt loader has no "
        f"INT4, MXFP4 or block-FP8 MoE scheme; a model's expert biases outside w4a16-int4 compressed-tensors; "
        f"fp8-block where a gate/up half or a fused sibling does not end on a 128-row block, as vLLM requires). "
        f"`tests/support/test_support.py` fails when this table is stale.",
        "",
        f"The vLLM column comes from `{VLLM_SWEEP}` (vLLM {verdicts.get('vllm') or '0.33'}'s own loader run on CPU by "
        f"`../shared/tools/vllm-load-check/`, bf16 tiny model, nvfp4): ✅ vLLM builds the model and loads every "
        f"tensor; ✅¹ the only unwritten parameters are vLLM placeholders no checkpoint name reaches (see "
        f"`tests/engines/vllm_check.py`); — refused by moeq; `not run` = not in the committed verdicts; "
        f"`no model class` = vLLM has no class for the tiny model's architecture.",
        "",
        f"**{n_pass} of {n_types} model types pass every applicable preset and layout.**",
        "",
        "| model type | experts class | layout flags | " + " | ".join(f"{p} ({layouts})" for p in PRESETS)
        + f" | vLLM load, nvfp4 ({layouts}) | notes |",
        "|---|---|---|" + "---|" * len(PRESETS) + "---|---|",
    ]
    for r in rows:
        cells = [f"`{r.model_type}`", f"`{r.experts_class}`", r.flags_text]
        cells += [_cell(r, p) for p in PRESETS]
        cells.append(vllm_cell(verdicts, r.model_type))
        cells.append(notes(r, verdicts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_SECTION = re.compile(re.escape(START) + r"\n(.*?)" + re.escape(END), re.S)


def read_section(text: str) -> str | None:
    """The README's current table section (between the markers), or None when the markers are missing."""
    m = _SECTION.search(text)
    return None if m is None else m.group(1)


def replace_section(text: str, body: str) -> str:
    """README text with the section between the markers replaced by `body` (inserted under a new
    ``## Supported models`` heading right before ``## How it works`` when the markers are missing)."""
    block = f"{START}\n{body}{END}"
    if _SECTION.search(text):
        return _SECTION.sub(lambda m: block, text, count=1)
    i = text.find("\n" + BEFORE_HEADING)
    if i < 0:
        raise ValueError(f"README has neither the {START} markers nor a {BEFORE_HEADING!r} heading to insert before")
    return text[: i + 1] + f"{HEADING}\n\n{block}\n\n" + text[i + 1:]
