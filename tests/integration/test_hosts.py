"""The data path across real hosts (network namespaces, a Ray node each, TCP gRPC between them): one worker's host
cut off under load, with no reset, while 2 replicas of every expert serve (tests/hosts.py runs the scenario)."""

import json
import subprocess
import sys

import pytest

from tests.hosts import can_make_hosts

CUT_S = 10.0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    why_not = can_make_hosts()
    if why_not:
        pytest.skip(f"no real hosts on this machine: {why_not}")
    out = tmp_path_factory.mktemp("hosts") / "report.json"
    run = subprocess.run([sys.executable, "-m", "tests.hosts", "--cut-s", str(CUT_S), "--json-out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_host_cut_off_costs_no_request(report):
    assert report["requests"] > 0
    assert report["failed"] == 0, report["errors"]
    assert report["wrong"] == 0
    assert report["slowest_touched_s"] < 10.0  # far below the 30 s expert deadline it used to wait
    assert report["health"]["ejections"] >= 1  # it was noticed, not waited out


def test_a_restored_host_serves_again(report):
    assert report["back_s"] < 30.0
    assert report["health"]["readmissions"] + report["health"]["replacements"] >= 1


def test_the_test_bed_leaves_no_namespace_or_link(report):
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "mc-h" not in namespaces and "mcbr0" not in links and "mc-v" not in links
