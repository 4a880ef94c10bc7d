"""Issue 5: two models quantized at once in two threads get exactly the results of
quantizing each alone (torch-function modes and moeq's hook stacks are per thread)."""

from __future__ import annotations

import threading

import torch

import moeq

from .helpers import assert_snapshots_equal, fresh, logits, mode_stack_len, snapshot, tm

MODELS = ("qwen3_moe", "gpt_oss")
N_BATCHES = 3


def _calib(model):
    return [tm.random_input_ids(model, 2, 16, seed=s) for s in range(1, N_BATCHES + 1)]


def test_two_models_in_two_threads(pristine):
    bases = {mt: pristine(mt) for mt in MODELS}
    ids = {mt: tm.random_input_ids(b, 2, 16, seed=99) for mt, b in bases.items()}

    alone = {}
    for mt, b in bases.items():
        m = fresh(b)
        moeq.quantize(m, "nvfp4", _calib(m), progress=False)
        alone[mt] = (snapshot(m), logits(m, ids[mt]))

    # Lockstep: both threads must be between two calibration batches, with their hooks
    # attached, before either goes on; so the calibrations really overlap.
    barrier = threading.Barrier(len(MODELS), timeout=60)
    models = {mt: fresh(b) for mt, b in bases.items()}
    results, errors, depth = {}, {}, {}

    def data(mt):
        for batch in _calib(models[mt]):
            barrier.wait()
            yield batch

    def work(mt):
        try:
            moeq.quantize(models[mt], "nvfp4", data(mt), progress=False)
            barrier.wait()  # both finished calibrating before either runs its fake-quant forward
            results[mt] = (snapshot(models[mt]), logits(models[mt], ids[mt]))
            depth[mt] = mode_stack_len()
        except BaseException as e:  # reported below
            errors[mt] = e
            barrier.abort()

    threads = [threading.Thread(target=work, args=(mt,)) for mt in MODELS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results) == sorted(MODELS)
    for mt in MODELS:
        assert depth[mt] == 0
        assert_snapshots_equal(results[mt][0], alone[mt][0])
        assert torch.equal(results[mt][1], alone[mt][1]), f"{mt}: fake-quant logits differ from the single-thread run"
    assert mode_stack_len() == 0


def test_quantized_model_runs_concurrently_in_two_threads(pristine):
    """Serving: one quantized model, fake-quant forwards in two threads at once (each call
    pushes its own mode on its own thread), same logits as in the main thread."""
    m = fresh(pristine("qwen3_5_moe"))
    ids = tm.random_input_ids(m, 2, 16, seed=99)
    moeq.quantize(m, "nvfp4", _calib(m), progress=False)
    here = logits(m, ids)
    assert not torch.equal(here, logits(pristine("qwen3_5_moe"), ids))
    barrier = threading.Barrier(2, timeout=60)
    out, errors = {}, []

    def work(k):
        try:
            for i in range(3):
                barrier.wait()
                out[(k, i)] = logits(m, ids)
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(out) == 6
    for y in out.values():
        assert torch.equal(y, here)
    assert mode_stack_len() == 0
