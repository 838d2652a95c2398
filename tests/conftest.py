import os
from pathlib import Path

import pytest

from cluster.demo_model import init_model
from experts.families import ARCHS
from tests.reference import MXFP4, write_mxfp4_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-weight checkpoint per family, made by `init-model`; and GPT-OSS's with mxfp4 experts."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {arch: init_model(root / arch, arch, seed=0) for arch in ARCHS}
    return {**made, MXFP4: write_mxfp4_checkpoint(made["gpt_oss"], root / MXFP4)}
