"""Continuous batching: requests join and leave the running batch at every decode step.

Each lane owns a batch and its KV cache; request handlers talk to it through `Sequence.emit`.
B = running sequences, S = cached positions, V = vocabulary
"""

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator

import torch
from transformers import DynamicCache

from cluster.engine import kv_batch
from cluster.engine.detokenize import IncrementalText
from cluster.engine.sampling import Sampler, prompt_logprobs, token_logprob
from cluster.engine.sequence import Event, SamplingParams, Sequence, TokenLogprob
from cluster.engine.waiting import Waiting
from cluster.errors import ExpertUnavailable, as_serving_error
from experts.threads import use_process_threads

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.1  # how long an idle lane waits for work before it looks at `close` again


class Engine:
    """Admission for `lanes` batches: while one lane's MoE layer waits on the expert workers, another computes
    (two micro-batches in ping-pong). With `background`, each lane steps in a thread of its own until `close`;
    without, the caller drives it with `step` (as `generate` and `stream` then do)."""

    def __init__(self, model, tokenizer, context_len: int, max_batch_size: int = 64, max_waiting: int = 1024,
                 step_tokens=None, lanes: int = 1, background: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.step_tokens = step_tokens or _no_context  # (input ids) -> a context each forward runs in
        self.context_len, self.max_batch_size = context_len, max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model, tokenizer)
        self._waiting = Waiting(max_waiting)
        self._closed = threading.Event()
        self.background = background
        self.lanes = [_Lane(self, i) for i in range(lanes)]
        if background:
            for lane in self.lanes:
                threading.Thread(target=lane.loop, name=f"moecluster-engine-{lane.index}", daemon=True).start()

    def submit(self, sequence: Sequence) -> None:
        self.submit_all([sequence])

    def submit_all(self, sequences: list[Sequence]) -> None:
        """Sequences that wait together and join a batch together: the prompts and choices of one request."""
        for sequence in sequences:
            sequence.text = IncrementalText(self.tokenizer)
            sequence.sampler = Sampler(sequence.params, len(sequence.prompt_ids), self.eos_ids)
        self._waiting.put_all(sequences)

    def resize_queue(self, max_waiting: int) -> None:
        """How many sequences may wait for a batch slot, from now on."""
        self._waiting.max_waiting = max_waiting

    def step(self) -> bool:
        """One iteration of every lane: admit waiting sequences, prefill them, decode a token for each running
        one. False when there was nothing to do."""
        stepped = [lane.step(wait_s=0) for lane in self.lanes]  # every lane, even after one had work
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
        return sum(len(lane.running) for lane in self.lanes)

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

    def admit(self, lane: "_Lane", wait_s: float) -> list[Sequence]:
        """New sequences for `lane`: its fair share of what runs and waits; an idle lane waits up to `wait_s`."""
        new = []
        if not lane.running:
            first = self._waiting.get(wait_s)
            if first is None:
                return []
            new = [first]
        total = sum(len(other.running) for other in self.lanes) + len(new) + len(self._waiting)
        share = min(-(-total // len(self.lanes)), self.max_batch_size // len(self.lanes) or 1)
        new += self._waiting.take(share - len(lane.running) - len(new))
        return [s for s in new if not s.cancelled]


class _Lane:
    """One running batch with its own KV cache."""

    def __init__(self, engine: Engine, index: int):
        self.engine, self.model, self.index = engine, engine.model, index
        self.running: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, S]

    def loop(self) -> None:
        use_process_threads()
        while not self.engine._closed.is_set():
            self.step(wait_s=IDLE_WAIT_S)

    def step(self, wait_s: float) -> bool:
        """Admit, prefill the new sequences, decode one token for every running one; False if there was nothing."""
        new = self.engine.admit(self, wait_s)
        if not new and not self.running:
            return False
        try:
            with torch.inference_mode():
                if new:
                    self._prefill(new)
                if self.running:
                    self._decode()
        except Exception as error:  # a failed step fails every sequence in it, never a wrong token
            if isinstance(as_serving_error(error), ExpertUnavailable):
                log.warning("engine step failed: %s", error)
            else:
                log.exception("engine step failed")
            self._fail(self.running + [s for s in new if s not in self.running], error)
        return True

    def _prefill(self, seqs: list[Sequence]) -> None:
        ids, mask = kv_batch.left_padded([s.prompt_ids for s in seqs], self.engine.pad_id)  # [n, L], [n, L]
        cache = kv_batch.new_cache(self.model.config)
        scored = [s.params.prompt_logprobs is not None for s in seqs]
        logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, every_position=any(scored))
        for seq, rows, score in zip(seqs, logits, scored):  # rows: [L or 1, V]
            if score:
                seq.prompt_logprobs = prompt_logprobs(rows[-len(seq.prompt_ids):], seq.prompt_ids,
                                                      seq.params.prompt_logprobs)
        self._join(seqs, cache, mask)
        self._advance(seqs, logits[:, -1])

    def _decode(self) -> None:
        last = torch.tensor([[s.generated[-1]] for s in self.running])  # [B, 1]
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)  # [B, S + 1]
        positions = torch.tensor([[s.length - 1] for s in self.running])  # [B, 1]
        logits = self._forward(last, self._mask, positions, self._cache)
        self._advance(self.running, logits[:, -1])

    def _forward(self, ids, mask, positions, cache, every_position: bool = False) -> torch.Tensor:
        """[B, L, V] logits at every position, or [B, 1, V] at the last only."""
        with self.engine.step_tokens(ids):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=0 if every_position else 1,
            )
        return out.logits.float()

    def _join(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        if not self.running:
            self.running, self._cache, self._mask = list(seqs), cache, mask
            return
        width = max(mask.shape[1], self._mask.shape[1])
        self._mask = kv_batch.pad_left(self._cache, self._mask, width)
        mask = kv_batch.pad_left(cache, mask, width)
        kv_batch.concat(self._cache, cache)
        self._mask = torch.cat([self._mask, mask])
        self.running += seqs

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()  # [B], one call for every greedy row
        for seq, row, best in zip(seqs, logits, greedy):
            p, sampler = seq.params, seq.sampler
            if p.max_tokens == 0:  # scoring a prompt (echo): its logprobs are the whole answer
                seq.done = True
                seq.emit(Event(token_ids=[], text="", finish_reason="length", prompt_logprobs=seq.prompt_logprobs))
                continue
            if sampler.adjust:
                row = sampler.adjusted(row, seq.prompt_ids + seq.generated)
            token = best if p.temperature == 0 and not sampler.adjust else sampler.draw(row)
            logprob = None if p.logprobs is None else token_logprob(row, token, p.temperature, p.logprobs)
            self._append(seq, token, logprob)
        keep = [i for i, s in enumerate(self.running) if not (s.done or s.cancelled)]
        if len(keep) < len(self.running):
            self._mask = kv_batch.select_rows(self._cache, self._mask, keep) if keep else None
            self.running = [self.running[i] for i in keep]
            if not keep:
                self._cache = None

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        seq.generated.append(token)
        seq.text.add(token)
        text = seq.text.text
        stop_at = min((i for i in (text.find(s) for s in seq.params.stop) if i >= 0), default=-1)
        finish = None
        if (token in self.engine.eos_ids and not seq.params.ignore_eos) or stop_at >= 0:
            finish, text = "stop", text[:stop_at] if stop_at >= 0 else seq.text.flush()
        elif len(seq.generated) >= seq.params.max_tokens or seq.length >= self.engine.context_len:
            finish, text = "length", seq.text.flush()
        end = len(text) if finish else len(text) - _unsettled_suffix(text, seq.params.stop)
        delta = text[seq.sent_chars:end] if end > seq.sent_chars else ""
        seq.sent_chars += len(delta)
        seq.done = finish is not None
        seq.emit(Event(token_ids=[token], text=delta, finish_reason=finish,
                       logprobs=None if logprob is None else [logprob], prompt_logprobs=seq.prompt_logprobs))
        seq.prompt_logprobs = None

    def _fail(self, seqs: list[Sequence], error: Exception) -> None:
        serving_error = as_serving_error(error)
        for seq in seqs:
            seq.done = True
            seq.emit(Event(token_ids=[], text="", error=serving_error))
        self.running, self._cache, self._mask = [], None, None


def _unsettled_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may still change: the start of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _no_context(ids):
    return contextlib.nullcontext()


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
