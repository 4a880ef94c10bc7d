"""The two writers agree: our ModelOpt NVFP4 export, run through compressed-tensors' own
ModelOpt -> compressed-tensors converter, is our compressed-tensors export tensor for tensor."""

from __future__ import annotations

import pytest
import torch

from .helpers import NVFP4_PRESETS, quant_config, read_checkpoint, tm

ModelOptNvfp4Converter = pytest.importorskip(
    "compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4").ModelOptNvfp4Converter

GLOBAL_SCALES = ("weight_global_scale", "input_global_scale")


@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
@pytest.mark.parametrize("preset", NVFP4_PRESETS)
def test_ct_converter_of_modelopt_export_equals_ct_export(zoo, model_type, preset):
    mo = zoo.exported(model_type, preset, "modelopt")
    ct = zoo.exported(model_type, preset, "compressed-tensors")
    ignore = quant_config(ct.path)["ignore"]
    assert ignore == quant_config(mo.path)["ignore"]
    converter = ModelOptNvfp4Converter(ignore=ignore, targets=["Linear"])
    converted = converter.validate(read_checkpoint(mo.path))  # validate = process + orphan/dtype checks
    ours = read_checkpoint(ct.path)

    assert set(converted) == set(ours)
    n_global = 0
    for key, want in ours.items():
        got = converted[key]
        if key.rpartition(".")[2] in GLOBAL_SCALES:
            # ModelOpt scales are 0-d and the converter keeps that shape; transformers' compressed-tensors
            # loader needs [1], which is what we write. The values must be bit-identical.
            assert got.shape == () and want.shape == (1,), key
            got = got.reshape(1)
            n_global += 1
        assert got.dtype == want.dtype and got.shape == want.shape, f"{key}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
        assert torch.equal(got, want), key
    assert n_global > 0


@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_ct_config_matches_converter_config(zoo, model_type):
    """The W4A4 NVFP4 quantization scheme we declare is the one compressed-tensors' converter declares."""
    ct = zoo.exported(model_type, "nvfp4", "compressed-tensors")
    ours = quant_config(ct.path)
    theirs = ModelOptNvfp4Converter(ignore=ours["ignore"], targets=["Linear"]).update_config(None).model_dump()
    assert ours["format"] == theirs["format"] == "nvfp4-pack-quantized"
    assert ours["quantization_status"] == theirs["quantization_status"] == "compressed"
    (g_ours,), (g_theirs,) = ours["config_groups"].values(), theirs["config_groups"].values()
    for part in ("weights", "input_activations"):
        a = {k: str(v) for k, v in g_ours[part].items() if v is not None}
        b = {k: str(v) for k, v in g_theirs[part].items() if v is not None}
        assert a == b, part
