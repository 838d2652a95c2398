import shutil

import pytest
from safetensors.torch import load_file, save_file

from experts.bank import ExpertBank
from experts.checkpoint import CheckpointError
from router.model import load_dense_model


def _copy_without(src, dst, drop: str):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    del tensors[drop]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_expert_tensor_is_named_at_load(checkpoints, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _copy_without(checkpoints["mixtral"], tmp_path / "m", name)
    with pytest.raises(CheckpointError, match="layer 1 expert 3 down projection is missing"):
        ExpertBank(tmp_path / "m", [(1, 3)])
    ExpertBank(tmp_path / "m", [(1, 2)])  # the other experts still load


def test_missing_dense_tensor_is_named_at_load(checkpoints, tmp_path):
    _copy_without(checkpoints["qwen2_moe"], tmp_path / "q", "model.layers.0.mlp.shared_expert_gate.weight")
    with pytest.raises(CheckpointError, match="shared_expert_gate.weight"):
        load_dense_model(tmp_path / "q")


def test_directory_without_safetensors_is_refused(checkpoints, tmp_path):
    shutil.copy(checkpoints["olmoe"] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_dense_model(tmp_path)


def test_dense_checkpoint_is_not_an_moe(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not an MoE checkpoint"):
        load_dense_model(tmp_path)
