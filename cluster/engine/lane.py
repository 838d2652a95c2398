"""One running batch with its own KV cache. A step prefills admitted prompts, then decodes a token for every
running sequence. While sequences decode, a step prefills at most a budget of prompt tokens: prompts whole and
together where they fit, else one prompt a chunk at a time in a cache of its own, which joins the batch once the
prompt is done. So running streams never wait for a whole long prefill.

B = running sequences, S = cached positions (left-padded), V = vocabulary, n = a chunk's tokens
"""

import logging

import torch
from transformers import DynamicCache

from cluster.engine import kv_batch
from cluster.engine.sampling import prompt_logprobs, token_logprob
from cluster.engine.sequence import Event, Sequence, TokenLogprob
from cluster.errors import ExpertUnavailable, as_serving_error

log = logging.getLogger(__name__)


class Lane:
    def __init__(self, engine, index: int):
        self.engine, self.model, self.index = engine, engine.model, index
        self.device = self.model.device
        self.running: list[Sequence] = []
        self.prefilling: list[Sequence] = []  # admitted, their prompts not yet wholly in a cache
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, S]

    def cache_positions(self) -> int:
        """Positions this lane's caches hold or its admitted prompts will: padding counts, as it takes memory."""
        batch = self._mask.numel() if self._mask is not None else 0
        return batch + sum(s.prefill_len for s in self.prefilling)

    def step(self) -> bool:
        """Admit, prefill within the step's budget, decode one token for every running sequence; False if there
        was nothing to do."""
        self.prefilling += self.engine.admit(self)
        self.prefilling = [s for s in self.prefilling if not s.cancelled]
        if not self.prefilling and not self.running:
            return False
        try:
            with torch.inference_mode():
                if self.prefilling:
                    self._prefill(self.engine.prefill_chunk_tokens if self.running else None)
                if self.running:
                    self._make_room()
                    self._decode()
        except Exception as error:  # a failed step fails every sequence in it, never a wrong token
            if isinstance(as_serving_error(error), ExpertUnavailable):
                log.warning("engine step failed: %s", error)
            else:
                log.exception("engine step failed")
            self._fail(self.running + self.prefilling, error)
        return True

    # --- prefill ---

    def _prefill(self, budget: int | None) -> None:
        """Prompts in the order they came, within `budget` tokens (None: all)."""
        left = float("inf") if budget is None else budget
        while self.prefilling and left > 0:
            head = self.prefilling[0]
            self._reuse_prefix(head)
            if head.cache is None and head.prefill_len <= left:
                whole = self._whole_prompts(left)
                self._prefill_whole(whole)
                left -= sum(s.prefill_len for s in whole)
            else:
                chunk = min(head.prefill_len - head.prefilled, left)
                self._prefill_chunk(head, int(chunk))
                left -= chunk

    def _whole_prompts(self, budget: float) -> list[Sequence]:
        """The waiting prompts from the first that together fit `budget` and have no cached prefix."""
        taken, used = [], 0
        for seq in self.prefilling:
            self._reuse_prefix(seq)
            if seq.cache is not None or used + seq.prefill_len > budget:
                break
            taken.append(seq)
            used += seq.prefill_len
        return taken

    def _prefill_whole(self, seqs: list[Sequence]) -> None:
        source = self.engine.prefix_cache
        ids, mask = kv_batch.left_padded([s.prefill_ids for s in seqs], self.engine.pad_id, self.device)  # [n, L]
        cache = kv_batch.new_cache(self.model.config)
        scored = [s.scores_prompt for s in seqs]
        logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, every_position=any(scored))
        width = ids.shape[1]
        for row, (seq, rows, score) in enumerate(zip(seqs, logits, scored)):  # rows: [L or 1, V]
            if score:
                seq.prompt_logprobs = prompt_logprobs(rows[-len(seq.prompt_ids):], seq.prompt_ids,
                                                      seq.params.prompt_logprobs)
            start = width - seq.prefill_len
            self._remember(seq, [(k[row:row + 1, :, start:], v[row:row + 1, :, start:]) for k, v in _kv(cache)],
                           source)
        self.prefilling = self.prefilling[len(seqs):]
        fresh = [i for i, s in enumerate(seqs) if not s.generated]  # a preempted sequence has its next token
        self._sample([seqs[i] for i in fresh], logits[fresh, -1])
        staying = [i for i, s in enumerate(seqs) if not (s.done or s.cancelled)]
        if len(staying) < len(seqs) and staying:
            mask = kv_batch.select_rows(cache, mask, staying)
        if staying:
            self._join([seqs[i] for i in staying], cache, mask)

    def _prefill_chunk(self, seq: Sequence, n: int) -> None:
        """The next `n` positions of one prompt, into its own cache."""
        if seq.cache is None:
            seq.cache, seq.prefix_source = kv_batch.new_cache(self.model.config), self.engine.prefix_cache
        start, end = seq.prefilled, seq.prefilled + n
        ids = torch.tensor([seq.prefill_ids[start:end]], device=self.device)  # [1, n]
        mask = torch.ones(1, end, dtype=torch.long, device=self.device)
        logits = self._forward(ids, mask, torch.arange(start, end, device=self.device)[None], seq.cache,
                               every_position=seq.scores_prompt)
        if seq.scores_prompt:
            seq.scored_rows.append(logits[0])
        seq.prefilled = end
        if end < seq.prefill_len:
            return
        if seq.scores_prompt:
            rows = torch.cat(seq.scored_rows)  # [L, V]
            seq.prompt_logprobs = prompt_logprobs(rows, seq.prompt_ids, seq.params.prompt_logprobs)
        self._remember(seq, _kv(seq.cache), seq.prefix_source)
        self.prefilling.remove(seq)
        cache, seq.cache, seq.scored_rows, seq.prefilled = seq.cache, None, [], 0
        if not seq.generated:
            self._sample([seq], logits[:, -1])
        if not (seq.done or seq.cancelled):
            self._join([seq], cache, mask)

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start `seq`'s own cache from the longest cached prefix of its prompt, if any is cached; once."""
        prefixes = self.engine.prefix_cache
        if seq.prefix_checked or prefixes is None or seq.scores_prompt:  # scoring needs every position's logits
            return
        seq.prefix_checked = True
        length, kv = prefixes.lookup(seq.prefill_ids)
        if not length:
            return
        seq.cache, seq.prefix_source = kv_batch.new_cache(self.model.config), prefixes
        for layer, (keys, values) in enumerate(kv):
            seq.cache.update(keys, values, layer)
        seq.prefilled = length

    def _remember(self, seq: Sequence, kv, source) -> None:
        """Keep `seq`'s prompt KV in the prefix cache that was current when its prefill began (`source`), only if
        it still is: one forgotten since (a change of routing) would take KV of the old math."""
        if source is not None and source is self.engine.prefix_cache:
            source.insert(seq.prefill_ids, kv)

    # --- decode ---

    def _make_room(self) -> None:
        """Preempt the newest running sequences while the next decode step would pass the KV-cache budget: their
        cache is dropped and they wait again at the front, to be prefilled again (their streams only wait). The
        last running sequence is never preempted."""
        budget = self.engine.kv_cache_tokens
        while budget is not None and len(self.running) > 1 and (
                self.engine.cache_positions() + len(self.running) > budget):
            keep = list(range(len(self.running) - 1))
            victim = self.running[-1]
            self._mask = kv_batch.select_rows(self._cache, self._mask, keep)
            self.running = self.running[:-1]
            self.engine.preempted(victim)

    def _decode(self) -> None:
        last = torch.tensor([[s.generated[-1]] for s in self.running], device=self.device)  # [B, 1]
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)  # [B, S + 1]
        positions = torch.tensor([[s.length - 1] for s in self.running], device=self.device)  # [B, 1]
        logits = self._forward(last, self._mask, positions, self._cache)
        self._sample(self.running, logits[:, -1])
        self._drop_finished()

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

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """The next token of each of `seqs` from its logits [B, V], sent on."""
        greedy = logits.argmax(-1).tolist()  # [B], one call for every greedy row
        for seq, row, best in zip(seqs, logits, greedy):
            p, sampler = seq.params, seq.sampler
            if p.max_tokens == 0:  # scoring a prompt (echo): its logprobs are the whole answer
                seq.done = True
                seq.emit(Event(token_ids=[], text="", finish_reason="length", prompt_logprobs=seq.prompt_logprobs))
                continue
            if sampler.adjust or p.temperature or p.logprobs is not None:
                row = row.cpu()  # sampling on the host: a seeded draw is the same wherever the model runs
            if sampler.adjust:
                row = sampler.adjusted(row, seq.prompt_ids + seq.generated)
            token = best if p.temperature == 0 and not sampler.adjust else sampler.draw(row)
            logprob = None if p.logprobs is None else token_logprob(row, token, p.temperature, p.logprobs)
            self._append(seq, token, logprob)

    def _drop_finished(self) -> None:
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
            seq.cache = None
            seq.emit(Event(token_ids=[], text="", error=serving_error))
        self.running, self.prefilling, self._cache, self._mask = [], [], None, None


def _kv(cache: DynamicCache):
    """Each layer's (keys, values), [B, H, S, Dh]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _unsettled_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may still change: the start of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
