"""The data path across real hosts (network namespaces, a Ray node each, TCP gRPC between them): the cross-host
fault matrix of tests/host_matrix.py, with no reset from a host that is cut off, under load."""

import json
import subprocess
import sys

import pytest

from tests.host_matrix import FAULTS
from tests.hosts import can_make_hosts

REPLICATED = [name for name, fault in FAULTS.items() if fault.replicas > 1]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    why_not = can_make_hosts()
    if why_not:
        pytest.skip(f"no real hosts on this machine: {why_not}")
    out = tmp_path_factory.mktemp("hosts") / "matrix.json"
    run = subprocess.run([sys.executable, "-m", "tests.host_matrix", "--json-out", str(out)],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("fault", REPLICATED)
def test_a_host_fault_costs_no_request_where_experts_have_another_replica(matrix, fault):
    row = matrix[fault]
    if "skipped" in row:
        pytest.skip(row["skipped"])
    assert row["requests"] > 0
    assert (row["failed"], row["wrong"]) == (0, 0), row["errors"]
    assert row["slowest_touched_s"] < 10.0  # it used to wait out the 30 s expert deadline
    assert row["back_s"] < 240, f"never back to full capacity: {row.get('not_back')}"


def test_scaling_while_a_host_is_cut_off_completes_once_it_is_back(matrix):
    assert "scale_error" not in matrix["scale"], matrix["scale"]["scale_error"]


def test_a_lost_single_replica_fails_fast_naming_the_layer_and_expert(matrix):
    row = matrix["single"]
    assert row["failed"] > 0 and row["wrong"] == 0
    assert all(error.startswith("UNAVAILABLE: layer ") for error in row["errors"]), row["errors"]
    assert row["slowest_failure_s"] < 10.0  # not the 30 s expert deadline
    assert row["back_s"] < 30.0


def test_the_test_bed_leaves_no_namespace_or_link(matrix):
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "mc-h" not in namespaces and "mcbr0" not in links and "mc-v" not in links
