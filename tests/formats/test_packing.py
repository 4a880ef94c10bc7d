"""Exact pack/unpack round trips over random shapes (leading batch dims) and codes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeq.formats import fp4, int4, nvfp4

SETTINGS = settings(max_examples=60, deadline=None)

# leading batch dims (none up to three, e.g. [E, N]) and the packed length along K
lead_dims = st.lists(st.integers(1, 4), min_size=0, max_size=3)
seeds = st.integers(0, 2**31 - 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@SETTINGS
@given(lead=lead_dims, pairs=st.integers(1, 40), seed=seeds)
def test_fp4_codes_round_trip(lead, pairs, seed):
    codes = torch.randint(0, 16, (*lead, 2 * pairs), generator=gen(seed), dtype=torch.uint8)
    packed = fp4.pack(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, pairs)
    assert torch.equal(packed & 0x0F, codes[..., 0::2])  # element 2j low nibble
    assert torch.equal(fp4.unpack(packed), codes)


@SETTINGS
@given(lead=lead_dims, k=st.integers(1, 40), seed=seeds)
def test_fp4_bytes_round_trip(lead, k, seed):
    packed = torch.randint(0, 256, (*lead, k), generator=gen(seed), dtype=torch.uint8)
    codes = fp4.unpack(packed)
    assert codes.shape == (*lead, 2 * k)
    assert int(codes.max()) <= 15
    assert torch.equal(fp4.pack(codes), packed)


@SETTINGS
@given(lead=lead_dims, words=st.integers(1, 12), seed=seeds)
def test_int4_codes_round_trip(lead, words, seed):
    codes = torch.randint(-8, 8, (*lead, 8 * words), generator=gen(seed), dtype=torch.int8)
    packed = int4.pack(codes)
    assert packed.dtype == torch.int32
    assert packed.shape == (*lead, words)
    assert torch.equal((packed & 0xF).to(torch.int8) - 8, codes[..., 0::8])  # code 0 at bits 0..3
    assert torch.equal(int4.unpack(packed), codes)


@SETTINGS
@given(lead=lead_dims, words=st.integers(1, 12), seed=seeds)
def test_int4_words_round_trip(lead, words, seed):
    # every int32 bit pattern, negatives included, is a valid packed word
    packed = torch.randint(-(2**31), 2**31, (*lead, words), generator=gen(seed), dtype=torch.int64).to(torch.int32)
    codes = int4.unpack(packed)
    assert codes.dtype == torch.int8 and codes.shape == (*lead, 8 * words)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert torch.equal(int4.pack(codes), packed)


@SETTINGS
@given(lead=lead_dims, blocks=st.integers(1, 6), seed=seeds)
def test_nvfp4_quantize_pack_unpack_dequantize(lead, blocks, seed):
    # packing sits between quantize and dequantize without changing anything
    x = torch.randn(*lead, 2, 16 * blocks, generator=gen(seed))
    amax = x.abs().amax()
    q = nvfp4.quantize(x, amax)
    codes = nvfp4.unpack(nvfp4.pack(q.codes))
    assert torch.equal(codes, q.codes)
    assert torch.equal(nvfp4.dequantize(codes, q.block_scale, q.global_scale), nvfp4.fake_quant(x, amax))


@SETTINGS
@given(lead=lead_dims, groups=st.integers(1, 3), seed=seeds)
def test_int4_quantize_pack_unpack_dequantize(lead, groups, seed):
    x = torch.randn(*lead, 2, 32 * groups, generator=gen(seed))
    q = int4.quantize(x, group_size=32)
    codes = int4.unpack(int4.pack(q.codes))
    assert torch.equal(codes, q.codes)
    assert torch.equal(int4.dequantize(codes, q.scale), int4.fake_quant(x, group_size=32))
