import json
import shutil

import pytest

from experts import model_ref
from experts.checkpoint import CheckpointError
from experts.model_ref import ModelRef


@pytest.fixture
def copy(checkpoints, tmp_path):
    return shutil.copytree(checkpoints["mixtral"], tmp_path / "mixtral")


def test_a_node_with_the_same_bytes_finds_the_checkpoint(copy):
    assert ModelRef.here(str(copy)).local() == str(copy)


def test_a_missing_checkpoint_names_the_node_and_the_path(tmp_path):
    missing = tmp_path / "not-here"
    with pytest.raises(CheckpointError, match=rf"node \S+: no checkpoint at {missing}"):
        ModelRef(str(missing), "0" * 64).local()


def test_a_different_copy_at_the_same_path_is_refused(copy):
    ref = ModelRef.here(str(copy))
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-1] + b"\x01")
    with pytest.raises(CheckpointError, match=rf"node \S+: the checkpoint at {copy} differs"):
        ref.local()


def test_a_large_file_is_fingerprinted_by_its_header(copy, monkeypatch):
    monkeypatch.setattr(model_ref, "WHOLE_FILE_BYTES", 0)
    ref = ModelRef.here(str(copy))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # the same tensors, other values: not read
    assert ref.local() == str(copy)
    config = copy / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_local_experts": 2}))
    with pytest.raises(CheckpointError, match="differs"):
        ref.local()


def test_the_default_model_is_found_on_each_node():
    from cluster.demo_model import default_model_dir

    assert ModelRef.here(None).local() == str(default_model_dir())
