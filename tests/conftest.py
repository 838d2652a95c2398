import os
from pathlib import Path

import pytest

from cluster.demo_model import init_model
from experts.families import ARCHS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-weight checkpoint per family, made by `init-model`."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: init_model(root / arch, arch, seed=0) for arch in ARCHS}
