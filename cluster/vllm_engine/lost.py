"""The requests that needed a lost expert, found in vLLM's worker process before a token of theirs leaves it.

The expert op (`tier.route_experts`) never raises: a token whose expert has no live replica gets a NaN row, which
attention carries to its own request's logits and no other's. This logits processor finds those rows at sampling,
tells the serving replica whose requests they are and waits until it has heard (so the replica knows before the
step's tokens reach it; `engine.TierEngine` fails those requests with 503), and hands the sampler finite logits for
them. Every other request in the batch goes on, and the engine never sees an exception.

B = requests in the batch, V = vocabulary
"""

import json
import logging
import socket

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from cluster.vllm_engine import tier

log = logging.getLogger(__name__)
REQUEST_TAG = "moecluster_request"  # the key of SamplingParams.extra_args that holds the replica's request id
TELL_TIMEOUT_S = 10.0


class LostRequests(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        spec = tier.spec_in(vllm_config.additional_config)
        self.report_socket = spec.report_socket if spec is not None else None
        self.tags: dict[int, str] = {}  # batch index -> the replica's id of the request there
        self._replica: socket.socket | None = None

    def is_argmax_invariant(self) -> bool:
        return False  # it must run for greedy requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.tags, batch_update, lambda params, _, __: (params.extra_args or {}).get(REQUEST_TAG))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] logits, with the rows of requests that needed a lost expert made finite once the replica knows."""
        why = tier.lost_why()
        if not why:  # no expert was ever lost in this process: nothing is NaN
            return logits
        rows = logits.isnan().any(dim=-1).nonzero().squeeze(1).tolist()
        if not rows:
            return logits
        tags = sorted({self.tags[row] for row in rows if row in self.tags})
        if len(tags) < len(rows):
            log.error("%d requests that needed a lost expert carry no request id: they cannot be failed",
                      len(rows) - len(tags))
        self._tell(tags, why)
        return logits.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))

    def _tell(self, tags: list[str], why: str) -> None:
        """The replica hears of the lost requests and answers before the step goes on."""
        for attempt in range(2):  # a replica's socket closed since the last loss is opened again, once
            try:
                if self._replica is None:
                    self._replica = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._replica.settimeout(TELL_TIMEOUT_S)
                    self._replica.connect(self.report_socket)
                self._replica.sendall(json.dumps({"lost": tags, "why": why}).encode() + b"\n")
                if self._replica.recv(4096).endswith(b"\n"):
                    return
                raise OSError("the replica closed the connection")
            except OSError as error:
                if self._replica is not None:
                    self._replica.close()
                self._replica = None
                if attempt:
                    log.error("the serving replica did not hear of lost requests %s: %s", tags, error)
