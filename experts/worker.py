"""The expert worker as a Ray actor: it loads its own experts, serves them (gRPC, and a Unix socket for its own
host), and reports stats."""

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch

from experts.bank import ExpertBank
from experts.keys import expert_key
from experts.model_ref import ModelRef
from experts.service import ExpertServer
from experts.threads import usable_cores
from protos.wire.unix_stream import DEFAULT_LIMITS, FrameLimits


log = logging.getLogger(__name__)
OWNER_CHECK_S = 2.0


@dataclass(frozen=True)
class Owner:
    """The named actor whose workers these are. Once it has been gone for `grace_s` (longer than it takes to be
    started again) while no router called this worker, `release` frees what its workers hold, workers included."""

    name: str
    namespace: str
    release: Callable[[], None]
    grace_s: float = 30.0


class ExpertWorker:
    def __init__(self, model: ModelRef, pairs: list[tuple[int, int]], dtype: str | None, key: str,
                 threads: int | None = None, sharing: int = 1, limits: FrameLimits = DEFAULT_LIMITS,
                 owner: Owner | None = None):
        """`model`: found on this worker's node. `key`: its version's data-path key, which callers must send. `threads` unset: the cores this worker
        may use divided among the `sharing` workers that compute at once on its node."""
        torch.set_num_threads(threads or max(1, usable_cores() // sharing))
        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        device = "cuda" if gpu else "cpu"
        self.bank = ExpertBank(model.local(), pairs, getattr(torch, dtype) if dtype else None, device)
        self.server = ExpertServer(self.bank, key, host=ray.util.get_node_ip_address(), limits=limits)
        self.servicer, self._address = self.server.servicer, self.server.address
        if owner is not None:
            threading.Thread(target=_outlive_no_owner, args=(owner, lambda: self.servicer.counters()[1]),
                             name="owner-watch", daemon=True).start()

    def load(self, pairs: list[tuple[int, int]]) -> None:
        self.bank.add(pairs)

    def unload(self, pairs: list[tuple[int, int]]) -> None:
        self.bank.remove(pairs)

    def address(self) -> str:
        return self._address

    def stats(self) -> dict:
        tokens, compute_s = self.servicer.counters()
        return {
            "address": self._address,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "pairs": self.bank.pairs,
            "weight_bytes": self.bank.nbytes(),
            "resident_bytes": resident_bytes(),
            "device": str(self.bank.device),
            "tokens": {expert_key(*pair): n for pair, n in tokens.items()},
            "compute_s": compute_s,
        }

    def inject_fault(self, malformed_replies: bool) -> None:
        """For fault tests and chaos runs: every Forward reply misses a row until this is called with False."""
        self.servicer.malformed_replies = malformed_replies

    def health(self) -> bool:
        return True

    def shutdown(self) -> None:
        self.server.stop(grace=1.0)


def resident_bytes() -> int | None:
    """This process's resident memory, beside its weights in `stats` (None without Linux's /proc)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _outlive_no_owner(owner: Owner, served: Callable[[], float]) -> None:
    """Free the workers of an owner that is gone for good: its serving replicas died without releasing them.
    `served`: the compute seconds this worker has served so far. Routers that still call it are serving replicas
    of its version, alive: its owner is only away (its host cut off, or Serve starting it again)."""
    gone_since, seen = None, served()
    while True:
        time.sleep(OWNER_CHECK_S)
        before, seen = seen, served()
        if seen != before:
            gone_since = None
            continue
        try:
            ray.get_actor(owner.name, namespace=owner.namespace)
            gone_since = None
            continue
        except ValueError:
            gone_since = gone_since or time.monotonic()
        if time.monotonic() - gone_since >= owner.grace_s:
            log.warning("%s has been gone for %.0fs: freeing its expert workers", owner.name, owner.grace_s)
            owner.release()
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            return
