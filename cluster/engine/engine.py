"""Continuous batching: requests join and leave the running batch at every decode step.

Each lane (cluster/engine/lane.py) owns a batch and its KV cache; request handlers talk to it through
`Sequence.emit`. Admission is by batch slots and by KV-cache positions; a sequence preempted for room waits again
at the front.
"""

import contextlib
import queue
import threading
from collections.abc import Iterator

import torch

from cluster.engine.detokenize import IncrementalText
from cluster.engine.lane import Lane
from cluster.engine.packed import use_packed_attention
from cluster.engine.prefix_cache import PrefixCache
from cluster.engine.sampling import Sampler
from cluster.engine.sequence import Event, SamplingParams, Sequence
from cluster.engine.waiting import Waiting
from cluster.errors import InvalidRequest
from experts.threads import use_process_threads
from router.pingpong import interleave

IDLE_WAIT_S = 0.1  # how long an idle engine waits for work before it looks at `close` again


class Engine:
    """Admission for `lanes` batches, the micro-batches of each step: they run interleaved in one thread, so that
    while one lane's MoE layer waits on the expert workers, another computes (router/pingpong.py). With
    `background`, a thread steps them until `close`; without, the caller drives them with `step` (as `generate`
    and `stream` then do)."""

    def __init__(self, model, tokenizer, context_len: int, max_batch_size: int = 64, max_waiting: int = 1024,
                 step_tokens=None, lanes: int = 1, background: bool = True, prefill_chunk_tokens: int | None = None,
                 kv_cache_tokens: int | None = None, prefix_cache_tokens: int = 0):
        """`prefill_chunk_tokens`: most prompt tokens a step prefills while sequences decode (None: whole
        prompts); `kv_cache_tokens`: most KV-cache positions of all lanes (None: no bound);
        `prefix_cache_tokens`: positions of prompt prefixes kept for reuse (0: none)."""
        use_packed_attention(model)
        self.model, self.tokenizer = model, tokenizer
        self.step_tokens = step_tokens or _no_context  # (input ids) -> a context each forward runs in
        self.context_len, self.max_batch_size = context_len, max_batch_size
        self.prefill_chunk_tokens, self.kv_cache_tokens = prefill_chunk_tokens, kv_cache_tokens
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.preemptions = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model, tokenizer)
        self._waiting = Waiting(max_waiting)
        self._closed = threading.Event()
        self.background = background
        self.lanes = [Lane(self, i) for i in range(lanes)]
        if background:
            threading.Thread(target=self._loop, name="moecluster-engine", daemon=True).start()

    def submit(self, sequence: Sequence) -> None:
        self.submit_all([sequence])

    def submit_all(self, sequences: list[Sequence]) -> None:
        """Sequences that wait together and join a batch together: the prompts and choices of one request."""
        for sequence in sequences:
            if self.kv_cache_tokens is not None and len(sequence.prompt_ids) > self.kv_cache_tokens:
                raise InvalidRequest(f"prompt has {len(sequence.prompt_ids)} tokens; the KV cache holds "
                                     f"{self.kv_cache_tokens} positions (kv_cache_tokens)")
        for sequence in sequences:
            sequence.text = IncrementalText(self.tokenizer)
            sequence.sampler = Sampler(sequence.params, len(sequence.prompt_ids), self.eos_ids)
        self._waiting.put_all(sequences)

    def schedule(self, prefill_chunk_tokens: int | None, kv_cache_tokens: int | None, prefix_cache_tokens: int,
                 forget_prefixes: bool = False) -> None:
        """The budgets of the steps from now on (see __init__). The prefix cache starts empty when its capacity
        changes or with `forget_prefixes`: when the model's math changed (its routing), so did every cached KV."""
        self.prefill_chunk_tokens, self.kv_cache_tokens = prefill_chunk_tokens, kv_cache_tokens
        old = self.prefix_cache
        if prefix_cache_tokens != (old.capacity if old is not None else 0) or forget_prefixes:
            self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
            if old is not None and self.prefix_cache is not None:  # /metrics counts them: they never go back
                self.prefix_cache.asked, self.prefix_cache.found = old.asked, old.found

    def resize_queue(self, max_waiting: int) -> None:
        """How many sequences may wait for a batch slot, from now on."""
        self._waiting.max_waiting = max_waiting

    def step(self) -> bool:
        """One iteration of every lane, interleaved: admit waiting sequences, prefill them, decode a token for each
        running one. False when there was nothing to do."""
        with torch.inference_mode():  # entered once: a lane's own, entered and left in turns, would nest out of order
            stepped = interleave([lane.step for lane in self.lanes])
        return any(stepped)

    def stream(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float = 600) -> Iterator[Event]:
        """One request's events as they come; a failed request raises its error."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(Sequence(prompt_ids, params, events.put))
        while True:
            event = self._next(events, timeout_s)
            if event.error:
                raise event.error
            yield event
            if event.finish_reason:
                return

    def generate(self, prompts: list[list[int]], params: SamplingParams, timeout_s: float = 600) -> list[list[int]]:
        """The tokens generated for each prompt, all decoded together."""
        events: queue.Queue[tuple[int, Event]] = queue.Queue()
        self.submit_all([Sequence(ids, params, lambda event, i=i: events.put((i, event)))
                         for i, ids in enumerate(prompts)])
        out, left = [[] for _ in prompts], len(prompts)
        while left:
            i, event = self._next(events, timeout_s)
            if event.error:
                raise event.error
            out[i] += event.token_ids
            left -= event.finish_reason is not None
        return out

    def running(self) -> int:
        """Sequences in a batch: decoding, or their prompts being prefilled."""
        return sum(len(lane.running) + len(lane.prefilling) for lane in self.lanes)

    def cache_positions(self) -> int:
        return sum(lane.cache_positions() for lane in self.lanes)

    def cache_stats(self) -> dict:
        """The share of the KV-cache budget in use (0 without a budget), preemptions so far, and prompt positions
        looked up in the prefix cache and found there."""
        prefixes = self.prefix_cache
        return {"usage": self.cache_positions() / self.kv_cache_tokens if self.kv_cache_tokens else 0.0,
                "preemptions": self.preemptions, "prefix_queries": prefixes.asked if prefixes else 0,
                "prefix_hits": prefixes.found if prefixes else 0}

    def preempted(self, sequence: Sequence) -> None:
        """`sequence` left its batch for room: it waits again, first in line."""
        self.preemptions += 1
        sequence.prefix_checked = False
        self._waiting.put_first(sequence)

    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Stop the lanes' threads once their current step is done."""
        self._closed.set()

    def _next(self, events: queue.Queue, timeout_s: float):
        if self.background:
            return events.get(timeout=timeout_s)
        while events.empty():
            self.step()
        return events.get_nowait()

    def admit(self, lane: Lane) -> list[Sequence]:
        """New sequences for `lane`: its fair share of what runs and waits, as far as the KV-cache budget has
        room for their prompts."""
        busy = len(lane.running) + len(lane.prefilling)
        total = sum(len(other.running) + len(other.prefilling) for other in self.lanes) + len(self._waiting)
        share = min(-(-total // len(self.lanes)), self.max_batch_size // len(self.lanes) or 1)
        used = self.cache_positions()
        # with nothing cached, the first in line runs even if it outgrew the budget while it decoded before
        room = None if self.kv_cache_tokens is None or not used else self.kv_cache_tokens - used
        new = self._waiting.take(share - busy, room)
        return [s for s in new if not s.cancelled]

    def _loop(self) -> None:
        use_process_threads()
        while not self._closed.is_set():
            if not self.step():
                self._waiting.wait(IDLE_WAIT_S)


def _no_context(ids):
    return contextlib.nullcontext()


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
