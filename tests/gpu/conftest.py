"""`pytest -m gpu`: this machine as a one-node Ray cluster with its GPU, and the figures the checks measure."""

import os
import tempfile

import pytest

from tests.integration.conftest import inference_stub, serve_endpoints  # noqa: F401 (fixtures, on this cluster)

FIGURES: list[str] = []  # one line per measurement, printed at the end of the run


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from cluster.node_env import apply_node_env

    if not os.environ.get("RAY_TMPDIR"):  # unset or empty: Ray's socket paths must stay short, under /tmp
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-")
    apply_node_env()
    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """The GPU check makes its own Ray cluster, so it runs only when asked for, never beside the integration tests'."""
    if "gpu" in config.getoption("markexpr", ""):
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="the GPU check runs on its own: pytest -m gpu tests/gpu"))


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("GPU figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
