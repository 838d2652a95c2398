"""Continuous batching: requests join and leave the running batch at every decode step.

One thread owns the model and the batched KV cache; request handlers talk to it through `Sequence.emit`.
B = running sequences, S = cached positions, V = vocabulary
"""

import logging
import queue
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cluster import kv_batch
from cluster.detokenize import IncrementalText
from cluster.errors import ExpertUnavailable, Overloaded, as_serving_error
from cluster.sampling import sample_token
from experts.threads import use_process_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Event:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: Exception | None = None


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    emit: callable
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    cancelled: bool = False
    done: bool = False
    text: IncrementalText | None = None

    def __post_init__(self):
        self.generator = None if self.params.seed is None else torch.Generator().manual_seed(self.params.seed)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


class Engine:
    """Admission for `lanes` batches that step in their own threads: while one lane's MoE layer waits on the
    expert workers, another computes (two micro-batches in ping-pong)."""

    def __init__(self, model, tokenizer, context_len: int, max_batch_size: int = 64, max_waiting: int = 1024,
                 before_forward=None, lanes: int = 1):
        self.model, self.tokenizer = model, tokenizer
        self.before_forward = before_forward  # sees each step's input ids (token-keyed routing policies)
        self.context_len, self.max_batch_size = context_len, max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model, tokenizer)
        self._waiting: queue.Queue[Sequence] = queue.Queue(maxsize=max_waiting)
        self.lanes = [_Lane(self, i) for i in range(lanes)]

    def submit(self, sequence: Sequence) -> None:
        sequence.text = IncrementalText(self.tokenizer)
        try:
            self._waiting.put_nowait(sequence)
        except queue.Full:
            raise Overloaded(f"{self._waiting.maxsize} requests already wait for a batch slot; retry later") from None

    def admit(self, lane: "_Lane") -> list[Sequence]:
        """New sequences for `lane`: its fair share of what runs and waits, blocking while it has nothing."""
        new = [] if lane.running else [self._waiting.get()]
        total = sum(len(other.running) for other in self.lanes) + len(new) + self._waiting.qsize()
        share = min(-(-total // len(self.lanes)), self.max_batch_size // len(self.lanes) or 1)
        while len(lane.running) + len(new) < share and not self._waiting.empty():
            new.append(self._waiting.get_nowait())
        return [s for s in new if not s.cancelled]


class _Lane:
    """One running batch with its own KV cache, stepped by its own thread."""

    def __init__(self, engine: Engine, index: int):
        self.engine, self.model = engine, engine.model
        self.running: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, S]
        threading.Thread(target=self._loop, name=f"moecluster-engine-{index}", daemon=True).start()

    def _loop(self) -> None:
        use_process_threads()
        while True:
            new = self.engine.admit(self)
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

    def _prefill(self, seqs: list[Sequence]) -> None:
        width = max(len(s.prompt_ids) for s in seqs)
        pad = self.engine.pad_id
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in seqs])  # [n, L]
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs])  # [n, L]
        cache = kv_batch.new_cache(self.model.config)
        logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
        self._join(seqs, cache, mask)
        self._advance(seqs, logits)

    def _decode(self) -> None:
        last = torch.tensor([[s.generated[-1]] for s in self.running])  # [B, 1]
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)  # [B, S + 1]
        positions = torch.tensor([[s.length - 1] for s in self.running])  # [B, 1]
        logits = self._forward(last, self._mask, positions, self._cache)
        self._advance(self.running, logits)

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        if self.engine.before_forward is not None:
            self.engine.before_forward(ids)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()  # [B, V]

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
            p = seq.params
            self._append(seq, best if p.temperature == 0 else sample_token(row, p.temperature, p.top_p, seq.generator))
        keep = [i for i, s in enumerate(self.running) if not (s.done or s.cancelled)]
        if len(keep) < len(self.running):
            self._mask = kv_batch.select_rows(self._cache, self._mask, keep) if keep else None
            self.running = [self.running[i] for i in keep]
            if not keep:
                self._cache = None

    def _append(self, seq: Sequence, token: int) -> None:
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
        seq.emit(Event(token_ids=[token], text=delta, finish_reason=finish))

    def _fail(self, seqs: list[Sequence], error: Exception) -> None:
        serving_error = as_serving_error(error)
        for seq in seqs:
            seq.done = True
            seq.emit(Event(token_ids=[], text="", error=serving_error))
        self.running, self._cache, self._mask = [], None, None


def _unsettled_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may still change: the start of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
