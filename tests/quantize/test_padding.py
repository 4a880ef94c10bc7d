"""Issue 11: padding marked by attention_mask never reaches calibration statistics or token
counts, under every experts implementation and in calibrate-all-experts mode.

Reference: the same real tokens calibrated without padding, one sequence per batch. The pad
token's embedding is scaled 50x, so any padding that leaked into a statistic would move it.
"""

from __future__ import annotations

import pytest
import torch

import moeq

from .helpers import CORE_MODELS, fresh, tm

LENGTHS = (16, 9, 5)


def _stats(model):
    s = model.moeq_session
    out = {}
    for st in s.experts:
        out[st.target.name + ":tokens"] = st.tokens.clone()
        for p, a in st.in_amax.items():
            out[f"{st.target.name}.{p}"] = a.clone()
    out.update({n: st.in_amax.clone() for n, st in s.linears.items()})
    return out


def _setup(pristine, model_type, impl):
    base = fresh(pristine(model_type), impl)
    pad = 7
    with torch.no_grad():
        base.get_input_embeddings().weight[pad] *= 50
    g = torch.Generator().manual_seed(1)
    vocab = base.get_input_embeddings().num_embeddings
    seqs = []
    for n in LENGTHS:
        s = torch.randint(0, vocab, (n,), generator=g)
        s[s == pad] = pad + 1  # the pad token never occurs in real text
        seqs.append(s)
    ids = torch.full((len(seqs), max(LENGTHS)), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return base, seqs, ids, mask


@pytest.mark.parametrize("model_type,impl", [(m, "grouped_mm") for m in CORE_MODELS]
                         + [("qwen3_moe", "eager"), ("qwen3_moe", "batched_mm"), ("gpt_oss", "eager"),
                            ("gpt_oss", "batched_mm")])
@pytest.mark.parametrize("all_experts", [False, True], ids=["routed", "all-experts"])
def test_padding_never_reaches_statistics(pristine, model_type, impl, all_experts):
    if all_experts and impl != "grouped_mm":
        pytest.skip("all-experts mode is implementation-independent; one implementation is enough")
    base, seqs, ids, mask = _setup(pristine, model_type, impl)
    ref = fresh(base, impl)
    moeq.quantize(ref, "nvfp4", [s[None] for s in seqs], calib_all_experts=all_experts, progress=False)
    padded = fresh(base, impl)
    rep = moeq.quantize(padded, "nvfp4", [{"input_ids": ids, "attention_mask": mask}], calib_all_experts=all_experts,
                        progress=False)
    assert rep.calib_tokens == sum(LENGTHS)
    want, got = _stats(ref), _stats(padded)
    assert want.keys() == got.keys()
    for k in want:
        if k.endswith(":tokens"):
            assert torch.equal(got[k], want[k]), k
            assert int(got[k].sum()) == sum(LENGTHS) * tm.TOP_K
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_padding_leak_would_be_seen(pristine):
    """The check above can fail: calibrating on the padded batch WITHOUT its mask moves the
    statistics and token counts."""
    base, seqs, ids, mask = _setup(pristine, "qwen3_moe", "grouped_mm")
    ref = fresh(base)
    moeq.quantize(ref, "nvfp4", [s[None] for s in seqs], progress=False)
    leaky = fresh(base)
    moeq.quantize(leaky, "nvfp4", [ids], progress=False)
    want, got = _stats(ref), _stats(leaky)
    moved = [k for k in want if not k.endswith(":tokens") and not torch.allclose(got[k], want[k], rtol=1e-3)]
    assert moved  # (the RMSNorms before each module shrink the 50x embedding back: few amax move)
    assert all(not torch.equal(got[k], want[k]) for k in want if k.endswith(":tokens"))


def test_padded_outputs_of_real_tokens_unchanged(pristine):
    """Dropping padding inside the experts during calibration leaves the real tokens' logits
    as they are (the fake-quant model after calibration equals one calibrated unpadded)."""
    base, seqs, ids, mask = _setup(pristine, "mixtral", "grouped_mm")
    a, b = fresh(base), fresh(base)
    moeq.quantize(a, "fp8", [s[None] for s in seqs], progress=False)
    moeq.quantize(b, "fp8", [{"input_ids": ids, "attention_mask": mask}], progress=False)
    with torch.no_grad():
        la = a(input_ids=seqs[0][None], use_cache=False).logits
        lb = b(input_ids=seqs[0][None], use_cache=False).logits
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


def test_all_padding_batch_skipped_and_mask_shape_checked(pristine):
    base, seqs, ids, mask = _setup(pristine, "qwen3_moe", "grouped_mm")
    m = fresh(base)
    rep = moeq.quantize(m, "nvfp4", [{"input_ids": ids, "attention_mask": torch.zeros_like(mask)},
                                     {"input_ids": ids, "attention_mask": mask}], progress=False)
    assert rep.calib_batches == 1 and rep.calib_tokens == sum(LENGTHS)
    with pytest.raises(ValueError, match="attention_mask"):
        moeq.quantize(fresh(base), "nvfp4", [{"input_ids": ids, "attention_mask": mask[:, :3]}], progress=False)
