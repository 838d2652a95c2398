"""GPT-OSS checkpoints as released: experts in mxfp4, dequantized by each worker as transformers does."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from experts.bank import ExpertBank
from experts.checkpoint import CheckpointError, dequantize_mxfp4
from experts.layout import experts_modules
from tests.reference import MXFP4, transformers_model


def test_a_block_is_32_e2m1_values_under_one_power_of_two():
    # byte 0x21: low nibble 1 (0.5) first, high nibble 2 (1.0); 0xF9: -0.5 then -6; scale 128 is 2**1
    blocks = torch.tensor([[[0x21, 0xF9] + [0] * 14]], dtype=torch.uint8)  # [out 1, in / 32 = 1, 16]
    weight = dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8), torch.float32)
    assert weight.shape == (32, 1)  # [in, out], GPT-OSS's layout
    assert weight[:4, 0].tolist() == [1.0, 2.0, -1.0, -12.0]
    assert not weight[4:].any()


def test_workers_hold_the_experts_transformers_dequantizes(checkpoints):
    oracle = experts_modules(transformers_model(checkpoints[MXFP4]))
    bank = ExpertBank(checkpoints[MXFP4], [(0, 2), (0, 5), (1, 7)], torch.float32)
    for layer, expert in bank.pairs:
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            row = bank.layers[layer].checkpoint_row(name, expert)
            torch.testing.assert_close(row, getattr(oracle[layer], name)[expert], rtol=0, atol=0)


def _edited(checkpoints, path, edit):
    shutil.copytree(checkpoints[MXFP4], path)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_missing_scales_name_the_projection(checkpoints, tmp_path):
    path = _edited(checkpoints, tmp_path / "no-scales", lambda t: t.pop("model.layers.0.mlp.experts.down_proj_scales"))
    with pytest.raises(CheckpointError, match="layer 0 experts.down_proj is missing"):
        ExpertBank(path, [(0, 1)])


def test_scales_that_do_not_fit_the_blocks_are_named(checkpoints, tmp_path):
    name = "model.layers.1.mlp.experts.gate_up_proj_scales"
    path = _edited(checkpoints, tmp_path / "bad-scales", lambda t: t.update({name: t[name][:, :, :1].contiguous()}))
    with pytest.raises(CheckpointError, match="gate_up_proj_blocks of shape .* does not match .*gate_up_proj_scales"):
        ExpertBank(path, [(1, 0)])


def test_blocks_of_another_shape_than_the_model_are_named(checkpoints, tmp_path):
    def narrow_down_proj(tensors):
        for part in ("blocks", "scales"):
            name = f"model.layers.0.mlp.experts.down_proj_{part}"
            tensors[name] = tensors[name][:, :32].contiguous()  # 32 output rows where the model has 64

    path = _edited(checkpoints, tmp_path / "narrow", narrow_down_proj)
    with pytest.raises(CheckpointError, match=r"layer 0 expert 4 down_proj has shape \(64, 32\), the model expects"):
        ExpertBank(path, [(0, 4)])
